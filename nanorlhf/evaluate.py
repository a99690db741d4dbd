"""Evaluate a policy on held-out prompts, the same way for every method:
gold score (mean and standard error), RM reward, KL to the SFT reference, win rate
against SFT by the gold judge, response length and distinct-2 (diversity)."""
import numpy as np
import torch

from nanorlhf.judge import gold_scores
from nanorlhf.model import response_logprobs
from nanorlhf.reward import score
from nanorlhf.sampler import sample_responses


def mean_se(x):
    """Mean and its standard error sqrt(var / n)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def win_rate(gold_a, gold_b):
    """Share of prompts where a's gold score beats b's (ties count 1/2), and its standard error."""
    a, b = np.asarray(gold_a), np.asarray(gold_b)
    wins = (a > b) + 0.5 * (a == b)
    return mean_se(wins)


def distinct_n(texts, n=2):
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over the set."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def rm_rewards(rm, gain, bias, batches, rt):
    """Normalised RM reward of every sampled response (the batches of sample_responses)."""
    out = []
    for b in batches:
        with rt.autocast():
            out.append(score(rm, b["prompt"], b["prompt_mask"], b["tokens"], b["mask"]).float())
    return (gain * torch.cat(out) + bias).cpu().numpy()


@torch.no_grad()
def kl_to_reference(policy, reference, batches, rt, temperature):
    """Per response: sum over its tokens of log pi(y_t) - log pi_ref(y_t), a sample of KL(pi || pi_ref)."""
    out = []
    for b in batches:
        args = (b["prompt"], b["prompt_mask"], b["tokens"], b["mask"], temperature)
        with rt.autocast():
            out.append((response_logprobs(policy, *args) - response_logprobs(reference, *args)).sum(1))
    return torch.cat(out).cpu().numpy()


def evaluate_samples(texts, ended, rewards=None, kl=None, baseline_gold=None):
    """The table row of one method from its samples."""
    gold = gold_scores(texts, ended)
    row = {"gold": mean_se(gold), "length": mean_se([len(t.split()) for t in texts]),
           "ended": float(np.mean(ended)), "distinct2": distinct_n(texts)}
    if rewards is not None:
        row["reward"] = mean_se(rewards)
    if kl is not None:
        row["kl"] = mean_se(kl)
    if baseline_gold is not None:
        row["win_rate"] = win_rate(gold, baseline_gold)
    return row, gold


def evaluate_policy(policy, reference, rm, gain, bias, enc, prompts, cfg, rt, generator, baseline_gold=None):
    """Sample one response per prompt from policy and score it every way. Returns (row, samples)."""
    sampled = sample_responses(policy, enc, prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                               cfg.temperature, generator=generator)
    rewards = rm_rewards(rm, gain, bias, sampled["batches"], rt) if rm is not None else None
    kl = kl_to_reference(policy, reference, sampled["batches"], rt, cfg.temperature) if reference is not None else None
    row, gold = evaluate_samples(sampled["texts"], sampled["ended"], rewards, kl, baseline_gold)
    sampled.update(gold=gold, rewards=rewards)
    return row, sampled


def format_row(name, row):
    cells = [f"{name:<12}"]
    for key in ("gold", "reward", "kl", "win_rate", "length"):
        if key in row:
            m, se = row[key]
            cells.append(f"{key} {m:.3f} ± {se:.3f}")
    cells.append(f"ended {row['ended']:.0%} | distinct-2 {row['distinct2']:.3f}")
    return " | ".join(cells)
