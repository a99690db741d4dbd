"""The coursework's hints (python -m nanorlhf.assignments check --hint NAME shows them one tier at a time)."""

# name -> its hints, one tier per `check --hint NAME` call: what to read and the idea, then the pitfalls,
# then the equation as code would say it. Listed in the order to do them. The raise in a student copy
# names only the assignment and its docs section: the hints are asked for, never handed out.
HINTS = {
    "attention_kv_cache": [
        "Read KVCache.update and attention_bias in model.py: the cache returns every key/value column to "
        "attend over, the bias is 0 where a query may look and -inf where not.",
        "With a cache, the keys and values you attend over are what kv_cache.update returns, not the new ones "
        "alone; scale by 1/sqrt(head size); dropout only in training.",
        "K, V = kv_cache.update(layer, k, v, columns); y = softmax(q K^T / sqrt(hd) + attn_bias) V "
        "(F.scaled_dot_product_attention does the second line).",
    ],
    "generate": [
        "Read sample_token, _finish and naive_generate in sampler.py: your loop must draw exactly what "
        "naive_generate draws.",
        "Rows that have ended keep emitting EOS; the mask is 'not finished before this token', so the EOS "
        "itself is real; the new token's cache column must be marked real and its position advanced.",
        "each step: draw (token, logprob) with sample_token, force finished rows to eos_id, append "
        "token/logprob/finished-before-this-token, update finished, stop after the last step (or when every "
        "row ended), mark the new cache column real, feed the token at the next position.",
    ],
    "bradley_terry_loss": [
        "Bradley-Terry: P(chosen beats rejected) = sigmoid(r_chosen - r_rejected); the loss is its negative log.",
        "log(sigmoid(x)) overflows for large negative margins: use the stable log-sigmoid; weights give a "
        "weighted mean (divide by their sum).",
        "losses = -logsigmoid(r_chosen - r_rejected); return their mean, or sum(losses * weights) / sum(weights).",
    ],
    "reward_readout": [
        "The reward is read at the last real token of [left-padded prompt | right-padded response].",
        "The response starts at column P (the prompt's padded width); an empty response is read at the last "
        "prompt column.",
        "P + last_token_index(response_mask), or P - 1 when the response is empty.",
    ],
    "soft_bradley_terry_loss": [
        "Constitutional AI (Bai et al. 2022) labels a pair with a probability p that chosen is better: the loss is "
        "the cross-entropy of sigmoid(r_chosen - r_rejected) with p (at p = 1 it is bradley_terry_loss).",
        "p weighs log sigmoid(d), 1 - p weighs log sigmoid(-d) (not the other way round); use the stable "
        "log-sigmoid for both; weights give a weighted mean (divide by their sum).",
        "d = r_chosen - r_rejected; losses = -(p * logsigmoid(d) + (1 - p) * logsigmoid(-d)); their mean, or "
        "sum(losses * weights) / sum(weights).",
    ],
    "kl_penalty_rewards": [
        "Ziegler et al. 2019, Eq. 2: every real token pays beta times its log-ratio to the reference; the "
        "reward model's score comes once, at the end.",
        "The score goes on the last REAL token (not the last column); padding gets 0 and is never read; an "
        "empty response gets no score.",
        "rewards = -kl_coef * (logprobs - ref_logprobs) on real tokens, 0 on padding, plus scores[b] at row b's "
        "last real token (none for an empty row).",
    ],
    "compute_gae": [
        "Schulman et al. 2016, Eq. 16: the advantage is a discounted sum of TD errors, computed backwards.",
        "The value after the last real token is 0, whatever the padding holds (it may hold inf or nan); "
        "gamma discounts the next value, gamma * lam the next advantage; returns are A + V.",
        "backwards over t: delta = r_t + gamma * V_{t+1} - V_t (V after the last real token is 0), "
        "A_t = delta + gamma * lam * A_{t+1}; returns = A + V; both 0 on padding.",
    ],
    "masked_whiten": [
        "Whitening: subtract the mean, divide by the standard deviation, over real tokens only.",
        "Use masked_mean and masked_var (they never read the padding); the variance is the biased one; "
        "the 1e-8 goes inside the square root; the padding of the result is 0.",
        "(x - masked_mean) / sqrt(biased masked_var + 1e-8) over real tokens; add the mean back when not "
        "shift_mean; 0 on padding.",
    ],
    "policy_loss": [
        "Schulman et al. 2017, Eq. 7: the clipped surrogate, negated to a loss, averaged over real tokens.",
        "Use the clip you are given; take the larger (pessimistic) of the two negated terms; masked_mean "
        "never reads the padding; compute the stats without a gradient and without changing the inputs.",
        "ratio = exp(logprobs - old_logprobs); loss = masked mean of max(-A*ratio, -A*clip(ratio, 1-clip, "
        "1+clip)); stats clipfrac, approx_kl, ratio as in the comment above.",
    ],
    "value_loss": [
        "lm-human-preferences' clipped value loss: the new value may move at most clip away from the old one.",
        "The clip is around old_values (not around 0); take the larger of the two squared errors; the 0.5; "
        "the stat without a gradient.",
        "V_clip = old_values + clamp(values - old_values, -clip, clip); loss = 0.5 * masked mean of "
        "max((V - R)^2, (V_clip - R)^2); stats value_clipfrac.",
    ],
    "adaptive_kl": [
        "Ziegler et al. 2019, Sec. 2.2: a proportional controller moves beta towards the KL target.",
        "The error is clipped to [-0.2, 0.2]; beta rises when the KL is above target; the step scales with "
        "n_steps / horizon; beta must stay a Python float even when current_kl is a tensor.",
        "error = clip(current_kl / target - 1, -0.2, 0.2); self.value *= 1 + error * n_steps / horizon.",
    ],
    "dpo_loss": [
        "Rafailov et al. 2023, Eq. 7: Bradley-Terry on the implicit rewards beta * (log pi - log pi_ref).",
        "beta multiplies both sides; chosen minus rejected; the returned rewards carry no gradient.",
        "losses = -logsigmoid(beta * ((pc - rc) - (pr - rr))); chosen/rejected rewards = beta * (policy - ref) "
        "logps, detached.",
    ],
    "kl_k3": [
        "Schulman 2020, 'Approximating KL Divergence': k3 = (r - 1) - log r with r = p_ref(y) / pi(y), "
        "an unbiased, never negative estimate of KL(pi || p_ref) from one sample y ~ pi.",
        "The log-ratio is ref minus policy (log r = ref_logprobs - logprobs), not the other way round; k3 is 0 "
        "where they agree; r - 1 for r near 1 is exact with torch.expm1; keep the gradient.",
        "log_r = ref_logprobs - logprobs; return expm1(log_r) - log_r.",
    ],
    "leave_one_out_baseline": [
        "RLOO (Ahmadian et al. 2024, Eq. 7): each sample's baseline is the mean reward of the OTHER members of "
        "its group, so it does not depend on the sample's own reward.",
        "Count only the valid members (ragged groups; invalid slots may hold inf or nan: never read them, use "
        "torch.where, not a product with valid); a group of one has baseline 0; the result is 0 where not valid.",
        "zero the invalid rewards; n = valid count per row; b_i = (sum_j r_j - r_i) / max(n - 1, 1); "
        "times valid.",
    ],
    "group_advantages": [
        "GRPO (Shao et al. 2024, Sec. 4.1.2): A_i = (r_i - mean) / (std + eps) within each prompt's group; "
        "Dr. GRPO (Liu et al. 2025, scale_by_std=False) keeps r_i - mean only.",
        "Mean and std over the valid members only (invalid slots may hold inf or nan: never read them); the std "
        "with Bessel's correction (n - 1); eps added to the std, outside the root; 0 where not valid.",
        "zero the invalid rewards; mean = sum / n; c = (r - mean) * valid; if scale_by_std: "
        "std = sqrt(sum(c^2) / max(n - 1, 1)), c = c / (std + eps); return c.",
    ],
}
