"""Evaluate a policy on held-out prompts, the same way for every method:
gold score (mean and standard error), RM reward, KL to the SFT reference, win rate
against SFT by the gold judge, response length, distinct-2 (diversity) and how well
the RM still agrees with the gold judge on the policy's own samples, and the alignment tax: the held-out
language-modelling loss on the validation stories SFT was validated on. Best-of-n too, and the Goodhart
curves of over-optimisation: their fits and the test that a curve peaked and fell."""
import math

import numpy as np
import torch

from nanorlhf.data import encode_stories, load_corpus, story_batch, train_val_stories
from nanorlhf.judge import gold_scores
from nanorlhf.model import lm_loss, response_logprobs
from nanorlhf.metrics import print_samples
from nanorlhf.reward import normalised_scores
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


def pairwise_agreement(rewards, gold):
    """Share of response pairs the RM orders as the gold judge does: pairs that gold ties are left
    out, RM ties count 1/2. On a policy's own samples it falls as the policy exploits the RM."""
    r, g = np.asarray(rewards, dtype=float), np.asarray(gold, dtype=float)
    rm_order = np.sign(r[:, None] - r[None, :])  # (n, n)
    gold_order = np.sign(g[:, None] - g[None, :])
    pairs = np.triu(gold_order != 0, k=1)
    return float(np.mean((rm_order * gold_order)[pairs] + 1) / 2) if pairs.any() else float("nan")


def best_of_n_pick(rewards, n):
    """Index of the RM's favourite among each prompt's n samples. rewards (P * n,), a prompt's n
    samples side by side -> indices (P,) into rewards."""
    rewards = np.asarray(rewards)
    if len(rewards) % n:
        raise ValueError(f"best_of_n_pick got {len(rewards)} rewards, not a multiple of n={n}")
    return np.arange(len(rewards) // n) * n + rewards.reshape(-1, n).argmax(1)


# KL(best-of-n || pi) = log n - (n - 1) / n   (Stiennon et al. 2020, appendix; Hilton & Gao 2022)
# exact when the RM never ties, otherwise an upper bound (Beirami et al. 2024); in nats per response
def best_of_n_kl(n):
    return math.log(n) - (n - 1) / n


def best_of_n_blocks(rewards, values, n_max, n):
    """Best-of-n for each n from one draw of n_max samples per prompt (rewards and values (P * n_max,), a
    prompt's samples side by side): the RM's pick in each of the n_max / n disjoint blocks of n, the picks'
    values averaged per prompt -> (P,). Unbiased for best-of-n, with less variance than one block."""
    if n_max % n:
        raise ValueError(f"best-of-{n} needs n to divide the {n_max} samples per prompt: use powers of 2")
    picks = best_of_n_pick(rewards, n)  # blocks of n never cross prompts, as n divides n_max
    return np.asarray(values, dtype=float)[picks].reshape(-1, n_max // n).mean(1)


# Goodhart curves (Gao et al. 2022): the gain over the starting policy, gold(d) - gold(0) (or the proxy's), against
# d = sqrt(KL to it). RL: gain = d (alpha - beta log d); best-of-n: gain = d (alpha - beta d). Both are linear in
# alpha, beta: a least-squares fit on the features below, without an intercept (the gain at d = 0 is 0).
def goodhart_features(form, d):
    d = np.asarray(d, dtype=float)
    if form == "rl":
        return np.stack([d, -np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)], 1)  # d log d -> 0 at 0
    if form == "bon":
        return np.stack([d, -d * d], 1)
    raise ValueError(f"unknown Goodhart form {form!r}: rl | bon")


def goodhart_curve(form, d, alpha, beta):
    return goodhart_features(form, d) @ np.array([alpha, beta])


def fit_goodhart(form, d, gain):
    """alpha, beta of the form by least squares, and R^2 = 1 - SS_res / SS_tot (about the mean gain; it can
    be negative for a bad fit). nan where fewer than 2 points have d > 0 (two unknowns)."""
    X, y = goodhart_features(form, d), np.asarray(gain, dtype=float)
    if np.sum(np.asarray(d) > 0) < 2:
        return {"alpha": float("nan"), "beta": float("nan"), "r2": float("nan")}
    (alpha, beta), *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - X @ np.array([alpha, beta])) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2}


def running_mean(x, window):
    """Mean of the last `window` values at each point (fewer at the start)."""
    x = np.asarray(x, dtype=float)
    return np.array([x[max(0, i - window + 1):i + 1].mean() for i in range(len(x))])


def peak_vs_final(values, window, se=None):
    """Did a noisy per-iteration curve peak and fall? The highest mean over `window` consecutive iterations
    against the mean of the last window. A window mean's standard error: from the spread of its values
    (std / sqrt(window); the drift within the window counts as noise, so it errs large), or, given each
    iteration's own se (of its samples), sqrt(sum se^2) / window. z = (peak - final) / sqrt(se_peak^2 + se_final^2).
    The peak is the maximum of many windows, so it is biased upwards: read a z of 3 as the least evidence."""
    x = np.asarray(values, dtype=float)
    if len(x) < window:
        raise ValueError(f"peak_vs_final needs at least window={window} values, got {len(x)}")
    means = running_mean(x, window)[window - 1:]  # full windows only: means[i] is x[i:i + window]
    peak = int(np.argmax(means))

    def window_se(i):
        if se is None:
            return float(x[i:i + window].std(ddof=1) / math.sqrt(window)) if window > 1 else float("nan")
        return float(math.sqrt(np.sum(np.asarray(se[i:i + window], dtype=float) ** 2)) / window)

    last = len(means) - 1
    drop, drop_se = float(means[peak] - means[last]), math.hypot(window_se(peak), window_se(last))
    return {"window": window, "se_from": "spread" if se is None else "samples", "peak_end": peak + window - 1,
            "peak": float(means[peak]), "peak_se": window_se(peak), "final": float(means[last]),
            "final_se": window_se(last), "drop": drop, "drop_se": drop_se,
            "z": drop / drop_se if drop_se > 0 else float("nan")}


@torch.no_grad()
def kl_to_reference(policy, reference, batches, rt, temperature):
    """Per response: sum over its tokens of log pi(y_t) - log pi_ref(y_t), a sample of KL(pi || pi_ref)."""
    out = []
    for b in batches:
        args = (b["prompt"], b["prompt_mask"], b["tokens"], b["mask"], temperature)
        with rt.autocast():
            out.append((response_logprobs(policy, *args) - response_logprobs(reference, *args)).sum(1))
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def heldout_lm_loss(model, enc, dataset, rt, batch_size=16):
    """The alignment tax's measure (Ouyang et al. 2022, Sec. 4.2): mean -log p per token of every validation
    story (the split train_sft.py validates on; loss on whole stories, as SFT from scratch trains), cut to the
    model's block_size. RL that keeps the SFT model's language raises it little. -> nats per token."""
    seqs, prompt_lens = encode_stories(enc, train_val_stories(load_corpus(dataset))[1])
    total, tokens = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        rows = range(start, min(start + batch_size, len(seqs)))
        x, y, loss_mask = (t.to(rt.device) for t in story_batch(seqs, prompt_lens, rows, model.config.block_size,
                                                                 enc.eot_token, loss_on_response=False))
        with rt.autocast():
            logits = model(x)  # (b, T, V)
        n = int(loss_mask.sum())
        total, tokens = total + float(lm_loss(logits, y, loss_mask)) * n, tokens + n
    return total / max(tokens, 1)


def evaluate_samples(prompts, texts, ended, rewards=None, kl=None, baseline_gold=None):
    """The table row of one method from its samples."""
    gold = gold_scores(prompts, texts, ended)
    row = {"gold": mean_se(gold), "length": mean_se([len(t.split()) for t in texts]),
           "ended": float(np.mean(ended)), "distinct2": distinct_n(texts)}
    if rewards is not None:
        row["reward"] = mean_se(rewards)
        row["rm_gold_acc"] = pairwise_agreement(rewards, gold)
    if kl is not None:
        row["kl"] = mean_se(kl)
    if baseline_gold is not None:
        row["win_rate"] = win_rate(gold, baseline_gold)
    return row, gold


def evaluate_policy(policy, reference, rm, gain, bias, enc, prompts, cfg, rt, generator, baseline_gold=None):
    """Sample one response per prompt from policy and score it every way. Returns (row, samples)."""
    sampled = sample_responses(policy, enc, prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                               cfg.temperature, batch_size=cfg.sample_batch, generator=generator)
    rewards = normalised_scores(rm, gain, bias, sampled["batches"], rt).numpy() if rm is not None else None
    kl = kl_to_reference(policy, reference, sampled["batches"], rt, cfg.temperature) if reference is not None else None
    row, gold = evaluate_samples(prompts, sampled["texts"], sampled["ended"], rewards, kl, baseline_gold)
    sampled.update(gold=gold, rewards=rewards)
    return row, sampled


def evaluate_best_of_n(policy, rm, gain, bias, enc, prompts, n, cfg, rt, generator, baseline_gold=None):
    """Best-of-n (Stiennon et al. 2020; Nakano et al. 2021): n samples per prompt from policy, the one
    with the highest reward kept. The reward is PPO's: the RM's, or cfg.no_eos_penalty for a response
    that never ended. Its KL to policy is the analytic value. Returns (row, samples of the kept ones)."""
    sampled = sample_responses(policy, enc, [p for p in prompts for _ in range(n)], cfg.max_prompt_tokens,
                               cfg.max_new_tokens, rt, cfg.temperature, batch_size=cfg.sample_batch,
                               generator=generator)
    rewards = normalised_scores(rm, gain, bias, sampled["batches"], rt).numpy()  # (P * n,)
    picks = best_of_n_pick(np.where(sampled["ended"], rewards, cfg.no_eos_penalty), n)  # (P,)
    texts, ended = [sampled["texts"][i] for i in picks], [sampled["ended"][i] for i in picks]
    row, gold = evaluate_samples(prompts, texts, ended, rewards[picks], None, baseline_gold)
    row["kl"], row["kl_analytic"] = (best_of_n_kl(n), 0.0), True
    return row, {"texts": texts, "ended": ended, "gold": gold, "rewards": rewards[picks]}


def format_row(name, row):
    cells = [f"{name:<12}"]
    for key in ("gold", "reward", "kl", "win_rate", "length"):
        if key == "kl" and row.get("kl_analytic"):
            cells.append(f"kl {row['kl'][0]:.3f} (analytic)")
        elif key in row:
            m, se = row[key]
            cells.append(f"{key} {m:.3f} ± {se:.3f}")
    cells.append(f"ended {row['ended']:.0%} | distinct-2 {row['distinct2']:.3f}")
    if "rm_gold_acc" in row:
        cells.append(f"rm-gold agreement {agreement(row)}")
    if "lm_loss" in row:
        cells.append(f"LM loss {row['lm_loss']:.3f}")
    return " | ".join(cells)


def agreement(row):
    """The RM-gold agreement cell: n/a when the gold judge tied every pair (no order to agree with)."""
    value = row.get("rm_gold_acc", float("nan"))
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def compare_to_reference(name, policy, reference, rm, gain, bias, enc, prompts, cfg, rt):
    """The end of a training run: the reference (SFT) and the trained policy on the same held-out prompts
    with the same random draws; prints both rows and a few side-by-side samples. -> the eval_* metrics."""
    ref_row, ref_samples = evaluate_policy(reference, reference, rm, gain, bias, enc, prompts, cfg, rt,
                                           torch.Generator(rt.device).manual_seed(cfg.seed + 1))
    row, samples = evaluate_policy(policy, reference, rm, gain, bias, enc, prompts, cfg, rt,
                                   torch.Generator(rt.device).manual_seed(cfg.seed + 1),
                                   baseline_gold=ref_samples["gold"])
    print(f"held-out evaluation on {len(prompts)} prompts ({len(set(prompts))} distinct):")
    print(format_row("SFT", ref_row))
    print(format_row(name, row))
    print_samples([{"prompt": p, "response": f"[{name}] {a}\n[SFT] {b}", f"gold_{name.lower()}": ga, "gold_sft": gb}
                   for p, a, b, ga, gb in list(zip(prompts, samples["texts"], ref_samples["texts"],
                                                   samples["gold"], ref_samples["gold"]))[:3]])
    key = name.lower()
    lm_sft, lm_policy = (heldout_lm_loss(m, enc, cfg.dataset, rt) for m in (reference, policy))
    print(f"held-out LM loss on the validation stories (alignment tax): SFT {lm_sft:.4f} | {name} {lm_policy:.4f} "
          f"({lm_policy - lm_sft:+.4f} nats/token)")
    rest_of_table = {f"eval_{k}_{label}": r[k][0] if isinstance(r[k], tuple) else r[k]  # means, not their s.e.
                     for label, r in (("sft", ref_row), (key, row))
                     for k in ("rm_gold_acc", "distinct2", "length", "ended")}
    return {"eval_gold_sft": ref_row["gold"][0], "eval_gold_sft_se": ref_row["gold"][1],
            f"eval_gold_{key}": row["gold"][0], f"eval_gold_{key}_se": row["gold"][1],
            "eval_win_rate": row["win_rate"][0], "eval_kl": row["kl"][0],
            "eval_reward_sft": ref_row["reward"][0], f"eval_reward_{key}": row["reward"][0],
            "eval_lm_loss_sft": lm_sft, f"eval_lm_loss_{key}": lm_policy, **rest_of_table}
