"""The math of the critic-free policy-gradient methods beside PPO, as plain functions on tensors:
KL estimators, baselines and group-relative advantages, and the policy loss without a value model.

Tensors are (B, T) over response tokens; `mask` is 1 on real response tokens, 0 on right padding. Group
methods sample k responses per prompt; a batch holds them side by side, so `scores.view(-1, k)` is
(G, k), one row per prompt. `valid` (G, k) marks the members a group really has (ragged groups, padded).

References
  KL estimators: Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html)
  REINFORCE:     Williams 1992; with a baseline as in Ahmadian et al. 2024
  RLOO:          Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
                 from Human Feedback in LLMs" (leave-one-out baseline, Kool et al. 2019)
  GRPO:          Shao et al. 2024, "DeepSeekMath" (group-relative advantages, k3 KL term in the loss)
  Dr. GRPO:      Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
"""
import torch

from nanorlhf.ppo import masked_mean


# ---------------------------------------------------------------- KL estimators (Schulman 2020)

# Samples y ~ q = pi (the policy), p = pi_ref, and log r = log p(y) - log q(y). Each estimates
# KL(q || p) = E_q[log q - log p] from one sample:
#   k1 = -log r                  unbiased, high variance, negative on some samples
#   k2 = (log r)^2 / 2           biased (exact to second order when p ~ q), low variance, >= 0
#   k3 = (r - 1) - log r         unbiased (E_q[r] = 1), low variance, >= 0 on every sample
# (GRPO's KL term, Shao et al. 2024, Eq. 4; torch.expm1 keeps r - 1 exact for r near 1)
def kl_k1(logprobs, ref_logprobs):
    return logprobs - ref_logprobs


def kl_k2(logprobs, ref_logprobs):
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs, ref_logprobs):
    # BEGIN ASSIGNMENT kl_k3
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio
    # END ASSIGNMENT


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs, ref_logprobs, mask, estimator):
    """Per-token KL estimate (B, T) by estimator k1 | k2 | k3, 0 on padding."""
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs)
    return torch.where(mask > 0, kl, torch.zeros_like(kl))


# ---------------------------------------------------------------- baselines and advantages

def _group_sums(rewards, valid):
    valid = valid.to(rewards.dtype)
    rewards = torch.where(valid > 0, rewards, torch.zeros_like(rewards))
    return rewards, valid, rewards.sum(1, keepdim=True), valid.sum(1, keepdim=True)


# b_i = (sum_j r_j - r_i) / (n - 1): the mean reward of the other members of the group (Ahmadian et al. 2024,
# Eq. 7). It does not depend on r_i, so r_i - b_i is an unbiased advantage. A group of one has no other
# member: its baseline is 0 (plain REINFORCE).
def leave_one_out_baseline(rewards, valid):
    """rewards, valid (G, k) -> baselines (G, k), 0 where not valid."""
    # BEGIN ASSIGNMENT leave_one_out_baseline
    rewards, valid, total, n = _group_sums(rewards, valid)
    baseline = (total - rewards) / (n - 1).clamp(min=1)
    return baseline * valid
    # END ASSIGNMENT


# A_i = (r_i - mean(r)) / (std(r) + eps) within the group (Shao et al. 2024, Sec. 4.1.2: outcome supervision),
# std with Bessel's correction (n - 1); scale_by_std False: A_i = r_i - mean(r) (Liu et al. 2025, Dr. GRPO:
# the std division weights prompts whose k rewards nearly agree, too easy or too hard, the most).
def group_advantages(rewards, valid, scale_by_std=True, eps=1e-4):
    """rewards, valid (G, k) -> advantages (G, k), 0 where not valid."""
    # BEGIN ASSIGNMENT group_advantages
    rewards, valid, total, n = _group_sums(rewards, valid)
    mean = total / n.clamp(min=1)
    centred = (rewards - mean) * valid
    if scale_by_std:
        std = ((centred ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    return centred
    # END ASSIGNMENT


class RunningMeanBaseline:
    """REINFORCE's baseline: an exponential moving average of the batch's mean reward,
    b <- decay * b + (1 - decay) * mean(r), read before the update (it must not depend on this batch)."""

    def __init__(self, decay):
        self.decay, self.value = float(decay), None

    def advantages(self, rewards):
        """rewards (B,) -> r - b (B,); then b moves towards this batch's mean."""
        mean = float(rewards.mean())
        baseline = mean if self.value is None else self.value  # the first batch: its own mean
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return rewards - baseline

    def state_dict(self):
        return {"value": self.value, "decay": self.decay}

    def load_state_dict(self, state):
        self.value = state["value"]


# ---------------------------------------------------------------- the policy loss without a critic

# Every token of a response shares its advantage A (one reward per response, no value model):
#   l_t = max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps)),  ratio_t = pi(y_t) / pi_old(y_t)
# plus kl_coef * KL_t when the KL is a term of the loss (GRPO). The tokens are then averaged:
#   "sequence"  (1/B) sum_i (1/|y_i|) sum_t l_t           GRPO (Shao et al. 2024, Eq. 3): a long response's
#               tokens count less, so a wrong long answer is punished less per token (the length bias)
#   "constant"  (1/(B * max_len)) sum_i sum_t l_t           Dr. GRPO (Liu et al. 2025): the same weight for
#               every token; the sequence-level REINFORCE gradient A * grad sum_t log pi, scaled
def aggregate(per_token, mask, normaliser, max_len):
    """per_token, mask (B, T) -> scalar, by normaliser "sequence" | "constant" (max_len: its constant)."""
    mask = mask.to(per_token.dtype)
    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    if normaliser == "sequence":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if normaliser == "constant":
        return per_token.sum() / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown normaliser {normaliser!r}: sequence | constant")


def pg_loss(logprobs, old_logprobs, advantages, mask, clip, normaliser, max_len, ref_logprobs=None, kl_coef=0.0,
            kl_estimator="k3"):
    """logprobs, old_logprobs, mask (B, T), advantages (B,) -> scalar loss, stats (0-dim tensors).
    ref_logprobs given: kl_coef * the kl_estimator term is added to every token (GRPO's KL in the loss)."""
    log_ratio = logprobs - old_logprobs                                  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(ratio.dtype)                            # (B, 1): every token of a response
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    stats = {}
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
        stats["kl_loss"] = aggregate(kl.detach(), mask, normaliser, max_len)
    loss = aggregate(per_token, mask, normaliser, max_len)
    with torch.no_grad():
        stats.update(clipfrac=masked_mean((clipped > unclipped).to(ratio.dtype), mask),
                     approx_kl=masked_mean(0.5 * log_ratio ** 2, mask), ratio=masked_mean(ratio, mask))
    return loss, stats
