"""The PPO math of RLHF, all of it, as plain functions on tensors.

Tensors are (B, T) over response tokens; `mask` is 1 on real response tokens
(through the first <|endoftext|>), 0 on right padding. Every masked reduction in
nanorlhf goes through masked_mean / masked_var below.

References
  GAE:   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  PPO:   Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
  RLHF:  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (code: openai/lm-human-preferences)
         Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT)
         Huang et al. 2023, "The N Implementation Details of RLHF with PPO" (the conventions that code follows)
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- masking helpers

def masked_mean(x, mask, dim=None):
    # mean over real tokens: sum(x * mask) / sum(mask); padding may hold any value, even nan/inf.
    # An empty mask gives 0, not nan.
    mask = mask.to(x.dtype)
    x = torch.where(mask > 0, x, torch.zeros_like(x))
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_var(x, mask, unbiased=True):
    # var = mean((x - mean)^2) over real tokens, times n / (n - 1) if unbiased (Bessel's correction)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 real tokens, got {int(n)}; "
                             "pass unbiased=False or a batch with more tokens")
        var = var * n / (n - 1)
    return var


def last_token_index(mask):
    # (B, T) -> (B,) long: position of the last real token of each row, -1 for a row with none.
    # Right padding makes it mask.sum(1) - 1; taking the largest real position is also right
    # when a row's mask does not start at 0.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values


# ---------------------------------------------------------------- rewards and advantages

# r_t = -beta * (log pi(y_t) - log pi_ref(y_t))          on every real token (k1 KL estimator)
# r_T += RM score                                           on the last real token
# Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2 (the per-token split is lm-human-preferences').
def kl_penalty_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """scores (B,), logprobs/ref_logprobs/mask (B, T) -> rewards (B, T), 0 on padding."""
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}")
    # BEGIN ASSIGNMENT kl_penalty_rewards
    real = mask > 0
    kl = logprobs - ref_logprobs                                               # (B, T)
    rewards = torch.where(real, -kl_coef * kl, torch.zeros_like(kl))           # (B, T)
    last = last_token_index(mask)                                              # (B,)
    score = torch.where(last >= 0, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    bonus = torch.zeros_like(rewards).scatter(1, last.clamp(min=0)[:, None], score[:, None])  # (B, T)
    return rewards + bonus
    # END ASSIGNMENT


# delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   V after the last real token = 0
# A_t     = delta_t + gamma * lam * A_{t+1}      (Schulman et al. 2016, Eq. 16, computed backwards)
# R_t     = A_t + V(s_t)                          (the value target; lm-human-preferences)
@torch.no_grad()
def compute_gae(rewards, values, mask, gamma, lam):
    """rewards, values, mask (B, T), right padded -> advantages, returns (B, T), 0 on padding."""
    # BEGIN ASSIGNMENT compute_gae
    mask = mask.to(values.dtype)
    values = torch.where(mask > 0, values, torch.zeros_like(values))     # V beyond the end is 0
    rewards = torch.where(mask > 0, rewards, torch.zeros_like(rewards))
    B, T = values.shape
    next_value = values.new_zeros(B)                                     # V(s_{t+1})
    next_advantage = values.new_zeros(B)                                 # A_{t+1}
    advantages = torch.zeros_like(values)                                # (B, T)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    returns = advantages + values                                        # both 0 on padding
    return advantages, returns
    # END ASSIGNMENT


# x <- (x - mean) / sqrt(var + 1e-8) over real tokens, with the biased variance, as
# lm-human-preferences' whiten(); shift_mean=False adds the mean back (used for rewards).
def masked_whiten(x, mask, shift_mean=True):
    """x, mask (B, T) -> x (B, T) whitened over real tokens, 0 on padding."""
    # BEGIN ASSIGNMENT masked_whiten
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask > 0, whitened, torch.zeros_like(whitened))
    # END ASSIGNMENT


# ---------------------------------------------------------------- losses

# ratio = pi(y_t) / pi_old(y_t) = exp(logprobs - old_logprobs)
# L = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )   (Schulman et al. 2017, Eq. 7, negated)
# stats (0-dim detached tensors, no GPU sync; float() them to print):
#   clipfrac  = fraction of real tokens where the clipped term is the larger (so its gradient is 0)
#   approx_kl = masked_mean(0.5 * (logprobs - old_logprobs)^2), lm-human-preferences' "approxkl"
#   ratio     = masked_mean(ratio); exactly 1 on the first minibatch if logprobs are aligned
def policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """logprobs, old_logprobs, advantages, mask (B, T) -> scalar loss, stats dict."""
    # BEGIN ASSIGNMENT policy_loss
    log_ratio = logprobs - old_logprobs                                  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats
    # END ASSIGNMENT


# V_clip = clip(V, V_old - eps, V_old + eps)
# L_V = 0.5 * masked_mean( max((V - R)^2, (V_clip - R)^2) )   (lm-human-preferences; Huang et al. 2023 detail)
# stats: value_clipfrac = fraction of real tokens where the clipped term is the larger.
def value_loss(values, old_values, returns, mask, clip):
    """values, old_values, returns, mask (B, T) -> scalar loss, stats dict."""
    # BEGIN ASSIGNMENT value_loss
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)   # (B, T)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats
    # END ASSIGNMENT


# ---------------------------------------------------------------- diagnostics

# H = -sum_v p(v) log p(v) per token, masked mean over real tokens. Logits of -inf (top-k) add 0.
def entropy_from_logits(logits, mask):
    """logits (B, T, V), mask (B, T) -> scalar mean entropy in nats."""
    logp = F.log_softmax(logits.float(), dim=-1)                           # (B, T, V)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)                 # (B, T)
    return masked_mean(entropy, mask)


# EV = 1 - Var(R - V) / Var(R) over real tokens: 1 is a perfect critic, 0 no better than
# a constant, < 0 worse; nan when the returns do not vary.
@torch.no_grad()
def explained_variance(values, returns, mask):
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ---------------------------------------------------------------- KL coefficient

class AdaptiveKLController:
    """Ziegler et al. 2019, Sec. 2.2: a proportional controller that steers the KL towards `target`.

    error = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + error * n_steps / horizon)
    n_steps is the number of episodes (samples) since the last update, as in lm-human-preferences.
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps):
        # BEGIN ASSIGNMENT adaptive_kl
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        # END ASSIGNMENT

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """Same interface, constant beta (the ablation of Ziegler et al. 2019)."""

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])
