"""The phases of one iteration of the critic-free methods that differ from PPO's (train_pg.py calls them, and
bench.py pg times them); the rollout, scoring and reference logprobs are PPO's own (nanorlhf/ppo_step.py).

    group_prompts    each prompt k times, side by side: rows [g*k, (g+1)*k) are prompt g's group
    pg_advantages    one advantage per response: reward minus a baseline, no value model
    pg_update        epochs passes of minibatches of the critic-free clipped loss, one policy step each

The math is in nanorlhf/pg.py. Tensors are (B, N) over response tokens, advantages (B,).
"""
import torch

from nanorlhf.distributed import all_reduce_mean
from nanorlhf.model import logprobs_from_logits, response_logits
from nanorlhf.optim import backward, optimizer_step
from nanorlhf.pg import group_advantages, kl_estimate, leave_one_out_baseline, pg_loss
from nanorlhf.ppo import entropy_from_logits
from nanorlhf.ppo_step import minibatch

KL_IN_REWARD = ("reinforce", "rloo")  # the others (grpo, drgrpo) put a KL term in the loss


def group_prompts(prompts, k):
    """[a, b] -> [a, a, ..., b, b, ...]: k copies of each prompt, a group's members side by side."""
    return [p for p in prompts for _ in range(k)]


def kl_estimator_of(algo, kl_estimator):
    """The estimator flag resolved: auto is k1 in the reward (as PPO, Ziegler et al. 2019) and k3 in the
    loss (Shao et al. 2024)."""
    return kl_estimator if kl_estimator != "auto" else "k1" if algo in KL_IN_REWARD else "k3"


@torch.no_grad()
def pg_advantages(algo, scores, old_logprobs, ref_logprobs, mask, k, kl_coef, kl_estimator, running_baseline=None):
    """scores (B,) in groups of k; old/ref logprobs, mask (B, N) -> advantages (B,), rewards (B,).
    reinforce, rloo: the reward is score - kl_coef * sum_t KL_t (KL in the reward, as PPO's detail 1, summed over
    the response: one action per response, Ahmadian et al. 2024), minus the running mean (reinforce) or the
    mean of the group's other k - 1 (rloo). grpo, drgrpo: the reward is the score; the advantage its distance
    from the group's mean, divided by the group's std for grpo."""
    rewards = scores.float()
    if algo in KL_IN_REWARD:
        rewards = rewards - kl_coef * kl_estimate(old_logprobs, ref_logprobs, mask, kl_estimator).sum(1)
    grouped = rewards.view(-1, k)  # (G, k)
    valid = torch.ones_like(grouped, dtype=torch.bool)  # every group is whole here
    if algo == "reinforce":
        adv = running_baseline.advantages(rewards)
    elif algo == "rloo":
        adv = (grouped - leave_one_out_baseline(grouped, valid)).view(-1)
    elif algo in ("grpo", "drgrpo"):
        adv = group_advantages(grouped, valid, scale_by_std=algo == "grpo").view(-1)
    else:
        raise ValueError(f"unknown algo {algo!r}: reinforce | rloo | grpo | drgrpo")
    return adv, rewards


def pg_update(policy, policy_opt, batch, first_order, minibatch_size, cfg, rt, generator, guard, step):
    """cfg.epochs passes over the batch in shuffled minibatches (the first pass in `first_order`, so its first
    minibatch has ratio exactly 1, detail 3), each the critic-free clipped loss and one step. batch holds the
    rollout, "old_logprobs", "ref_logprobs" (B, N) and "advantages" (B,). grpo normalises each response by
    its length, the others by the constant max_new_tokens (nanorlhf/pg.py); grpo and drgrpo add the KL
    term. -> the statistics of each minibatch, a list of dicts of 0-dim tensors."""
    kl_in_loss = cfg.algo not in KL_IN_REWARD
    normaliser = "sequence" if cfg.algo == "grpo" else "constant"
    stats = []
    for epoch in range(cfg.epochs):
        order = first_order if epoch == 0 else torch.randperm(len(first_order), generator=generator,
                                                              device=rt.device)
        for mb in order.split(minibatch_size):
            args = minibatch(batch, mb)
            mask = args[3]
            with rt.autocast():
                logits = response_logits(policy, *args)  # (b, N, V)
            new_logprobs = logprobs_from_logits(logits, args[2], cfg.temperature)  # fp32
            loss, loss_stats = pg_loss(new_logprobs, batch["old_logprobs"][mb], batch["advantages"][mb], mask,
                                       cfg.clip_range, normaliser, cfg.max_new_tokens,
                                       batch["ref_logprobs"][mb] if kl_in_loss else None, cfg.kl_coef,
                                       kl_estimator_of(cfg.algo, cfg.kl_estimator))
            backward(loss, rt)
            finite = optimizer_step(policy, policy_opt, rt, cfg.grad_clip)[0]
            guard.check(step, all_reduce_mean(loss.detach(), rt), finite, rt.scaler)
            with torch.no_grad():
                entropy = entropy_from_logits(logits.float() / cfg.temperature, mask)
            stats.append({"policy_loss": loss.detach(), "entropy": entropy, **loss_stats})
    return stats
