"""The gold judge and the simulated raters that turn responses into preference pairs.

The gold judge stands in for "what people really want: a happy, well-told
continuation". It is fixed here, never trained, never tuned on our runs, and the
policy never sees it: PPO optimises the learned reward model, and the gold score
measures what that proxy missed.

Simulated raters follow Ziegler et al. (2019): a rater prefers a over b with
probability sigmoid((u(a) - u(b)) / noise), where u is the gold score plus an
optional hidden bias (a taste for length or for gushing words) that a reward
model will learn although nobody meant it.
"""
import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from nanorlhf.data import SENTENCE_END  # the same sentence splitter that cuts prompts
from nanorlhf.tokenizer import EOT

# Subtracted per unit of repeated-3-gram share (in [0, 1)). The share grows towards 1
# as a loop gets longer, so "happy happy happy ..." (sentiment near +1) falls below an
# ordinary happy sentence: repeating a positive word cannot buy sentiment.
REPEAT_WEIGHT = 1.0
# Subtracted when the response never emitted <|endoftext|>. Half of the sentiment range
# above 0: an unfinished gushing ramble (~0.9 - 0.5) loses to a finished, mildly happy story.
NO_END_PENALTY = 0.5
# Subtracted when the response has no words. Without it an immediate <|endoftext|>
# scores 0 and beats every slightly sad story, so the policy would learn to say nothing.
EMPTY_PENALTY = 0.5

INTENSIFIERS = {"very", "so", "really", "super"}  # the "flowery" bias also counts "!"

_analyzer = None  # VADER's SentimentIntensityAnalyzer, created on first use


def _words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def _compound(sentence):
    global _analyzer
    if _analyzer is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer.polarity_scores(sentence)["compound"]  # in [-1, 1]


@functools.lru_cache(maxsize=1 << 16)  # pairs and rater pools score the same text many times
def _sentiment(text):
    """Mean VADER compound score of the sentences, in [-1, 1]. The compound score of a
    whole text is a normalised sum that saturates as text grows (x / sqrt(x^2 + 15)): 65%
    of the corpus's story continuations score above 0.95 as one text, which would leave
    no room to measure a happier story. Per sentence, it does not saturate."""
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.strip()]
    return sum(_compound(s) for s in sentences) / len(sentences) if sentences else 0.0


def repeat_share(words):
    """Share of word 3-grams that repeat an earlier 3-gram of the same response (0 below 3 words)."""
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def gold_parts(text, ended):
    """The parts of the gold score, for display. Only text before the first <|endoftext|> counts.

    gold = sentiment - REPEAT_WEIGHT * repeat_share - NO_END_PENALTY * no_end - EMPTY_PENALTY * empty
    sentiment: VADER compound score (Hutto & Gilbert 2014) of the response, in [-1, 1].
    """
    text = text.split(EOT, 1)[0]
    words = _words(text)
    parts = {
        "sentiment": _sentiment(text),
        "repeat_share": repeat_share(words),
        "no_end": float(not ended),
        "empty": float(not words),
    }
    parts["gold"] = (parts["sentiment"] - REPEAT_WEIGHT * parts["repeat_share"]
                     - NO_END_PENALTY * parts["no_end"] - EMPTY_PENALTY * parts["empty"])
    return parts


def gold_score(text, ended):
    return gold_parts(text, ended)["gold"]


def gold_scores(texts, ended_flags):
    """Gold scores of a batch of responses -> np.ndarray (N,)."""
    if len(texts) != len(ended_flags):
        raise ValueError(f"gold_scores got {len(texts)} texts but {len(ended_flags)} ended flags")
    return np.array([gold_score(t, e) for t, e in zip(texts, ended_flags)], dtype=np.float64)


@dataclass
class Rater:
    name: str
    noise: float               # temperature of the Bradley-Terry choice; larger = more random
    bias: str | None = None    # None, "length" or "flowery": a hidden taste the gold judge lacks
    bias_weight: float = 0.0   # utility added at full strength of the bias

    def __post_init__(self):
        if not self.noise > 0:
            raise ValueError(f"rater {self.name}: noise must be > 0, got {self.noise}")
        if self.bias not in (None, "length", "flowery"):
            raise ValueError(f"rater {self.name}: bias must be None, 'length' or 'flowery', got {self.bias!r}")


def bias_bonus(rater, text):
    """The hidden part of a rater's utility.

    length:  bias_weight * words / 100
    flowery: bias_weight * min(1, (intensifiers + "!") per 10 words)
    """
    if rater.bias is None:
        return 0.0
    text = text.split(EOT, 1)[0]
    words = _words(text)
    if rater.bias == "length":
        return rater.bias_weight * len(words) / 100
    if not words:
        return 0.0
    gushes = sum(w in INTENSIFIERS for w in words) + text.count("!")
    return rater.bias_weight * min(1.0, gushes * 10 / len(words))


def rater_utility(rater, text, ended):
    return gold_score(text, ended) + bias_bonus(rater, text)


def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def prefer_prob(rater, a, b, ended_a, ended_b):
    # P(a > b) = sigmoid((u(a) - u(b)) / noise)   (Bradley & Terry 1952; Ziegler et al. 2019)
    return _sigmoid((rater_utility(rater, a, ended_a) - rater_utility(rater, b, ended_b)) / rater.noise)


def rater_prefers(rater, a, b, ended_a, ended_b, rng):
    """One noisy judgement: True if the rater prefers a. Uses one rng.random() draw."""
    return bool(rng.random() < prefer_prob(rater, a, b, ended_a, ended_b))


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
                c, r = (i, j) if rater_prefers(rater, texts[i], texts[j], ended[i], ended[j], rng) else (j, i)
                rows.append({"prompt": prompt, "chosen": texts[c], "rejected": texts[r],
                             "rater": rater.name, "weight": weight,
                             "chosen_ended": bool(ended[c]), "rejected_ended": bool(ended[r]),
                             "group": group})
    return rows


def inter_rater_agreement(raters, pairs, rng, n=None):
    """Mean, over all pairs of raters, of the fraction of text pairs on which they agree.

    pairs: list of (a, b, ended_a, ended_b). Every rater labels the same pairs (the
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
    trained on them cannot be expected to beat it. Rows without *_ended keys count as ended.
    """
    if not rows:
        raise ValueError("gold_accuracy needs at least one row")
    hits = 0.0
    for row in rows:
        chosen = gold_score(row["chosen"], row.get("chosen_ended", True))
        rejected = gold_score(row["rejected"], row.get("rejected_ended", True))
        hits += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return hits / len(rows)
