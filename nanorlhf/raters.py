"""Simulated raters: they read the gold judge, add a hidden taste, and turn responses into preference pairs.

Following Ziegler et al. (2019), a rater prefers a over b with probability
sigmoid((u(a) - u(b)) / noise), where u is the gold score plus an optional hidden
bias (a taste for length, gushing words or flattering the reader) that a reward
model will learn although nobody meant it. A pool of raters with different noise
gives real disagreement.
"""
import math
from dataclasses import dataclass

import numpy as np

from nanorlhf.judge import _words, gold_score, gush_share, reader_sentences
from nanorlhf.tokenizer import EOT

BIASES = (None, "length", "flowery", "sycophancy")


@dataclass
class Rater:
    name: str
    noise: float               # temperature of the Bradley-Terry choice; larger = more random
    bias: str | None = None    # one of BIASES: a hidden taste the gold judge lacks
    bias_weight: float = 0.0   # utility added at full strength of the bias

    def __post_init__(self):
        if not self.noise > 0:
            raise ValueError(f"rater {self.name}: noise must be > 0, got {self.noise}")
        if self.bias not in BIASES:
            raise ValueError(f"rater {self.name}: bias must be one of {BIASES}, got {self.bias!r}")


def bias_bonus(rater, text):
    """The hidden part of a rater's utility.

    length:     bias_weight * words / 100
    flowery:    bias_weight * min(1, (intensifiers + "!") per 10 words)
    sycophancy: bias_weight * min(1, sentences that address the reader / 2)
    """
    if rater.bias is None:
        return 0.0
    text = text.split(EOT, 1)[0]
    if rater.bias == "length":
        return rater.bias_weight * len(_words(text)) / 100
    if rater.bias == "flowery":
        return rater.bias_weight * min(1.0, gush_share(text) * 10)
    return rater.bias_weight * min(1.0, reader_sentences(text) / 2)


def rater_utility(rater, prompt, text, ended):
    return gold_score(prompt, text, ended) + bias_bonus(rater, text)


def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def prefer_prob(rater, prompt, a, b, ended_a, ended_b):
    # P(a > b) = sigmoid((u(a) - u(b)) / noise)   (Bradley & Terry 1952; Ziegler et al. 2019)
    return _sigmoid((rater_utility(rater, prompt, a, ended_a) - rater_utility(rater, prompt, b, ended_b))
                    / rater.noise)


def rater_prefers(rater, prompt, a, b, ended_a, ended_b, rng):
    """One noisy judgement: True if the rater prefers a. Uses one rng.random() draw."""
    return bool(rng.random() < prefer_prob(rater, prompt, a, b, ended_a, ended_b))


def make_rater_pool(n_raters, noise_low, noise_high, bias=None, bias_weight=0.0):
    """Raters "rater0".. with noises log-spaced from noise_low to noise_high, so they disagree."""
    if n_raters < 1 or not 0 < noise_low <= noise_high:
        raise ValueError(f"need n_raters >= 1 and 0 < noise_low <= noise_high, "
                         f"got {n_raters}, {noise_low}, {noise_high}")
    noises = np.geomspace(noise_low, noise_high, n_raters)
    return [Rater(f"rater{i}", float(s), bias, bias_weight) for i, s in enumerate(noises)]


def label_pairs(prompts, responses_per_prompt, ended_per_prompt, raters, rng, k=2):
    """Turn k responses per prompt into preference rows.

    For each prompt one rater, drawn with rng.integers(len(raters)), compares all
    C(k, 2) pairs (i < j, in order), each with one independent rng.random() draw against
    prefer_prob. For k > 2 this stands in for the rater's ranking, but the draws are
    independent, so a noisy rater's comparisons can be cyclic (a > b > c > a), which the
    Bradley-Terry loss takes as it comes. As in InstructGPT (Ouyang et al. 2022, sec 3.5)
    the comparisons of one prompt form one batch element, so each pair weighs 1 / C(k, 2).
    A pair of identical texts states no preference and is skipped (without a draw).
    """
    if not len(prompts) == len(responses_per_prompt) == len(ended_per_prompt):
        raise ValueError("label_pairs needs one list of responses and one list of ended flags per prompt")
    if k < 2 or not raters:
        raise ValueError(f"label_pairs needs k >= 2 and at least one rater, got k={k}, {len(raters)} raters")
    weight = 1.0 / (k * (k - 1) / 2)
    rows = []
    for group, (prompt, texts, ended) in enumerate(zip(prompts, responses_per_prompt, ended_per_prompt)):
        if len(texts) != k or len(ended) != k:
            raise ValueError(f"prompt {group}: expected k={k} responses and ended flags, "
                             f"got {len(texts)} and {len(ended)}")
        rater = raters[rng.integers(len(raters))]
        for i in range(k):
            for j in range(i + 1, k):
                if texts[i] == texts[j]:
                    continue
                a_wins = rater_prefers(rater, prompt, texts[i], texts[j], ended[i], ended[j], rng)
                c, r = (i, j) if a_wins else (j, i)
                rows.append({"prompt": prompt, "chosen": texts[c], "rejected": texts[r],
                             "rater": rater.name, "weight": weight,
                             "chosen_ended": bool(ended[c]), "rejected_ended": bool(ended[r]),
                             "group": group})
    return rows


def inter_rater_agreement(raters, pairs, rng, n=None):
    """Mean, over all pairs of raters, of the fraction of text pairs on which they agree.

    pairs: list of (prompt, a, b, ended_a, ended_b). Every rater labels the same pairs (the
    first n of a random order when n is given), so this is the chance that two
    different raters of the pool agree on a pair.
    """
    if len(raters) < 2:
        raise ValueError("inter_rater_agreement needs at least 2 raters")
    if n is not None:
        pairs = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    labels = np.array([[rater_prefers(rater, *pair, rng) for pair in pairs] for rater in raters])  # (R, P)
    agree = [np.mean(labels[r] == labels[s]) for r in range(len(raters)) for s in range(r + 1, len(raters))]
    return float(np.mean(agree))


def gold_accuracy(rows):
    """Fraction of rows where gold(chosen) > gold(rejected), ties counting 1/2.

    The accuracy the gold judge itself reaches on these noisy labels: a reward model
    trained on them cannot be expected to beat it. Rows without *_ended keys count as ended;
    rows without a prompt are scored against an empty prompt (no off-topic cost).
    """
    if not rows:
        raise ValueError("gold_accuracy needs at least one row")
    hits = 0.0
    for row in rows:
        prompt = row.get("prompt", "")
        chosen = gold_score(prompt, row["chosen"], row.get("chosen_ended", True))
        rejected = gold_score(prompt, row["rejected"], row.get("rejected_ended", True))
        hits += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return hits / len(rows)
