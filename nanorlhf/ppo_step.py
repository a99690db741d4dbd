"""One PPO iteration as its phases, each one function: train_ppo.py calls them in order, and bench.py ppo
times the same calls.

    rollout          sample a response for each prompt with the current policy
    score_responses  the reward model's normalised score; a penalty for a response that never ended
    old_and_reference_logprobs   logprobs of the policy that sampled, of the frozen reference, and old values
    advantages       KL-shaped rewards -> GAE -> whitened advantages, and the value targets
    ppo_update       ppo_epochs passes of minibatches: clipped policy and value losses, one step each
                     (PPO-ptx: plus ptx_coef x the LM loss of a batch of training stories, ptx_loss_of)

The equations are in nanorlhf/ppo.py; this file only orders them. Tensors are (B, N) over response
tokens; `mask` is 1 on real response tokens (through the first <|endoftext|>), 0 on padding.
"""
import numpy as np
import torch

from nanorlhf.data import encode_stories, load_corpus, story_batch, train_val_stories
from nanorlhf.distributed import all_reduce_max, all_reduce_mean
from nanorlhf.evaluate import distinct_n
from nanorlhf.judge import gold_scores
from nanorlhf.model import ScalarGPT, lm_loss, logprobs_from_logits, response_logits, response_values
from nanorlhf.optim import backward, optimizer_step
from nanorlhf.ppo import compute_gae, entropy_from_logits, explained_variance, kl_penalty_rewards, last_token_index, \
    masked_whiten, policy_loss, value_loss
from nanorlhf.reward import normalised_score
from nanorlhf.sampler import generate


def value_model_from(rm, device):
    """The value model starts as the reward model with its head at zero: it predicts 0 until it learns
    (docs/design.md, detail 11)."""
    value_model = ScalarGPT(rm.gpt.config).to(device)
    value_model.load_state_dict(rm.state_dict())
    torch.nn.init.zeros_(value_model.head.weight)
    torch.nn.init.zeros_(value_model.head.bias)
    return value_model


def batch_sizes(rollout_batch, n_minibatches, world_size, n_prompts):
    """-> each rank's share of the rollout batch and its minibatch size, or a SystemExit that says the fix."""
    if rollout_batch > n_prompts:  # an iteration draws its prompts without replacement
        raise SystemExit(f"rollout_batch {rollout_batch} is more than the corpus's {n_prompts} training prompts: "
                         f"lower it")
    if rollout_batch % (world_size * n_minibatches):  # every rank steps on as many equal minibatches
        raise SystemExit(f"rollout_batch {rollout_batch} must be a multiple of processes ({world_size}) x "
                         f"n_minibatches ({n_minibatches})")
    per_rank = rollout_batch // world_size
    return per_rank, per_rank // n_minibatches


def rollout(policy, prompt, prompt_mask, max_new_tokens, temperature, eos_id, rt, generator, decode_step=None):
    """Sample one response per left-padded prompt (B, P) with the policy in eval mode -> a batch dict with
    "prompt", "prompt_mask", "response", "mask" and the sampler's "logprobs" (B, N), right padded."""
    policy.eval()
    with rt.autocast():
        out = generate(policy, prompt, prompt_mask, max_new_tokens, temperature, eos_id=eos_id, generator=generator,
                       decode_step=decode_step)
    policy.train()
    return {"prompt": prompt, "prompt_mask": prompt_mask, "response": out["tokens"], "mask": out["mask"],
            "logprobs": out["logprobs"]}


@torch.no_grad()
def score_responses(rm, gain, bias, batch, eos_id, no_eos_penalty, rt, raw=False):
    """The normalised RM score at the last real token (B,); a response that never emitted <|endoftext|>
    gets no_eos_penalty instead (details 1, 2, 10). Also returns `ended` (B,) bool, and with raw=True the
    scores before the penalty (an ensemble's member 0, which the monitors read)."""
    response, mask = batch["response"], batch["mask"]
    with rt.autocast():
        last = last_token_index(mask)  # (B,), -1 for an empty response
        ended = (last >= 0) & (response.gather(1, last.clamp(min=0)[:, None]).squeeze(1) == eos_id)
        raw_scores = normalised_score(rm, gain, bias, batch["prompt"], batch["prompt_mask"], response, mask)
        scores = torch.where(ended, raw_scores, torch.full_like(raw_scores, no_eos_penalty))
    return (scores, ended, raw_scores) if raw else (scores, ended)


def minibatch(batch, rows):
    """The model inputs of these rows: prompt, prompt_mask, response, mask."""
    return batch["prompt"][rows], batch["prompt_mask"][rows], batch["response"][rows], batch["mask"][rows]


@torch.no_grad()
def old_and_reference_logprobs(policy, reference, value_model, batch, order, minibatch_size, temperature, rt):
    """Logprobs of the responses under the policy that sampled them and under the frozen reference, and the
    value model's values, all (B, N) and 0 on padding. Computed in the minibatches of the first PPO epoch
    (`order`), so that its first minibatch reproduces them exactly: ratio 1, approx-KL 0 (detail 3).
    The temperature divides the logits here as in sampling (detail 4). Forwards under autocast; the
    logprobs and values come back in fp32, so the KL, GAE and whitening arithmetic stays fp32.
    value_model None (the critic-free methods, train_pg.py): the old values are 0."""
    mask = batch["mask"]
    old_logprobs, ref_logprobs, old_values = (torch.zeros_like(mask, dtype=torch.float) for _ in range(3))
    with rt.autocast():
        for mb in order.split(minibatch_size):
            args = minibatch(batch, mb)
            response = args[2]
            old_logprobs[mb] = logprobs_from_logits(response_logits(policy, *args), response, temperature)
            ref_logprobs[mb] = logprobs_from_logits(response_logits(reference, *args), response, temperature)
            if value_model is not None:
                old_values[mb] = response_values(value_model, *args)
    return old_logprobs * mask, ref_logprobs * mask, old_values * mask


@torch.no_grad()
def advantages(scores, old_logprobs, ref_logprobs, old_values, mask, kl_coef, gamma, lam, rt):
    """r_t = -kl_coef * KL_t, plus the score at the last real token (detail 1); GAE over response tokens
    (detail 5); advantages whitened over real tokens (detail 6) -> advantages, returns (B, N)."""
    with rt.autocast():
        rewards = kl_penalty_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = compute_gae(rewards, old_values, mask, gamma, lam)
        return masked_whiten(advantages, mask), returns


def ptx_loss_of(enc, cfg, rt, data_rng):
    """PPO-ptx (Ouyang et al. 2022, Eq. 2): the objective adds gamma * E_pretrain[log pi(x)], here the SFT
    loss on the training stories, one batch of rollout_batch / n_minibatches stories per PPO step, drawn from
    data_rng (saved with the run). -> a function policy -> LM loss, or None when cfg.ptx_coef is 0."""
    if not cfg.ptx_coef:
        return None
    seqs, prompt_lens = encode_stories(enc, train_val_stories(load_corpus(cfg.dataset))[0])
    rows_per_step = cfg.rollout_batch // cfg.n_minibatches

    def loss(policy):
        rows = data_rng.integers(0, len(seqs), rows_per_step)[rt.rank::rt.world_size]
        x, y, loss_mask = (t.to(rt.device) for t in story_batch(seqs, prompt_lens, rows, cfg.block_size,
                                                                 enc.eot_token, loss_on_response=False))
        with rt.autocast():
            logits = policy(x)  # (b, T, V)
        return lm_loss(logits, y, loss_mask)
    return loss


def ppo_update(policy, value_model, policy_opt, value_opt, batch, first_order, minibatch_size, cfg, rt, generator,
               guard, step, ptx_loss=None):
    """cfg.ppo_epochs passes over the batch in shuffled minibatches (the first pass in `first_order`), each a
    clipped policy loss + vf_coef * clipped value loss (+ cfg.ptx_coef * ptx_loss(policy), PPO-ptx) and one
    step of each optimizer (detail 7); the guard counts non-finite steps. batch holds the rollout and
    "old_logprobs", "old_values", "advantages", "returns" (B, N). Reads cfg's ppo_epochs, temperature,
    clip_range, clip_range_value, vf_coef, grad_clip (and ptx_coef).
    -> the statistics of each minibatch, a list of dicts of 0-dim tensors."""
    stats = []
    for epoch in range(cfg.ppo_epochs):
        order = first_order if epoch == 0 else torch.randperm(len(first_order), generator=generator,
                                                              device=rt.device)
        for mb in order.split(minibatch_size):
            args = minibatch(batch, mb)
            mask = args[3]
            with rt.autocast():
                logits = response_logits(policy, *args)  # (b, N, V)
                values = response_values(value_model, *args)  # (b, N)
            # losses in fp32, outside autocast: logprobs_from_logits upcasts the logits, response_values the values
            new_logprobs = logprobs_from_logits(logits, args[2], cfg.temperature)
            pg_loss, pg_stats = policy_loss(new_logprobs, batch["old_logprobs"][mb], batch["advantages"][mb], mask,
                                            cfg.clip_range)
            vf_loss, vf_stats = value_loss(values, batch["old_values"][mb], batch["returns"][mb], mask,
                                           cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            ptx_stats = {}
            if ptx_loss is not None:
                ptx = ptx_loss(policy)
                loss = loss + cfg.ptx_coef * ptx
                ptx_stats["ptx_loss"] = ptx.detach()
            backward(loss, rt)
            policy_finite = optimizer_step(policy, policy_opt, rt, cfg.grad_clip, update_scaler=False)[0]
            value_finite = optimizer_step(value_model, value_opt, rt, cfg.grad_clip)[0]  # fp16: one scaler update
            guard.check(step, all_reduce_mean(loss.detach(), rt), policy_finite and value_finite, rt.scaler)
            with torch.no_grad():
                entropy = entropy_from_logits(logits.float() / cfg.temperature, mask)
            stats.append({"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": entropy,
                          **pg_stats, **vf_stats, **ptx_stats})
    return stats


def rollout_kl(batch, rt):
    """KL(pi || pi_ref) per response, summed over its tokens, averaged over the batch (and the ranks): 0-dim."""
    return all_reduce_mean(((batch["old_logprobs"] - batch["ref_logprobs"]) * batch["mask"]).sum(1).mean(), rt)


def iteration_metrics(batch, scores, ended, prompts, texts, kl, kl_coef, stats, rt):
    """One iteration's log line: proxy reward and gold score of the rollouts, KL, and the update's statistics
    (their mean over minibatches; first_ratio / first_approx_kl from the first minibatch, 1 and 0: detail 3).
    The value model's keys only where there is one (stats hold a value_loss); distinct-2 of the texts."""
    mask = batch["mask"]
    first = stats[0]
    mean_stats = {k: float(all_reduce_mean(torch.stack([s[k] for s in stats]).mean(), rt)) for k in first}
    gold = gold_scores(prompts, texts, ended.tolist())
    metrics = {
        "reward": float(all_reduce_mean(scores.mean(), rt)),
        "gold": float(all_reduce_mean(torch.tensor(np.mean(gold)), rt)),
        # its standard error over the whole batch (every rank's samples): sqrt(mean of the ranks' var / n / W)
        "gold_se": float(all_reduce_mean(torch.tensor(np.var(gold, ddof=1) / len(gold) if len(gold) > 1 else np.nan),
                                         rt) / rt.world_size) ** 0.5,
        "kl": float(kl), "kl_coef": kl_coef, "entropy": mean_stats["entropy"],
        "clipfrac": mean_stats["clipfrac"], "approx_kl": mean_stats["approx_kl"], "ratio": mean_stats["ratio"],
        "first_ratio": float(first["ratio"]), "first_approx_kl": float(first["approx_kl"]),
        # the sampler's logprobs vs the teacher-forced pass: ~1e-6 when temperature and positions align
        "logprob_gap": float(all_reduce_max(((batch["logprobs"] - batch["old_logprobs"]).abs() * mask).max(), rt)),
        **({"value_loss": mean_stats["value_loss"],
            "explained_var": float(all_reduce_mean(explained_variance(batch["old_values"], batch["returns"], mask),
                                                   rt))} if "value_loss" in first else {}),
        **{k: mean_stats[k] for k in ("kl_loss", "ptx_loss") if k in first},
        "resp_len": float(all_reduce_mean(mask.sum(1).float().mean(), rt)),
        "ended": float(all_reduce_mean(ended.float().mean(), rt)),
        "distinct2": float(all_reduce_mean(torch.tensor(distinct_n(texts)), rt))}
    return metrics, gold
