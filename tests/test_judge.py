import math

import numpy as np
import pytest

from nanorlhf import judge
from nanorlhf.judge import (Rater, gold_accuracy, gold_parts, gold_score, gold_scores, inter_rater_agreement,
                            label_pairs, make_rater_pool, prefer_prob, rater_prefers, rater_utility)

HAPPY = "The girl was happy and smiled at her mom."
SAD = "The boy was sad and cried all day."


def vader(text):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer().polarity_scores(text)["compound"]


def test_gold_prefers_happy_over_sad():
    assert gold_score(HAPPY, True) > 0.5 > 0 > -0.5 > gold_score(SAD, True)


def test_gold_hand_computed_repeat_share():
    # words: the cat sat the cat sat -> 3-grams (the cat sat) (cat sat the) (sat the cat) (the cat sat)
    # one of four repeats an earlier 3-gram -> share 1/4
    text = "the cat sat the cat sat"
    assert gold_parts(text, True)["repeat_share"] == 0.25
    assert gold_score(text, True) == pytest.approx(vader(text) - judge.REPEAT_WEIGHT * 0.25)
    assert gold_parts("happy happy", True)["repeat_share"] == 0.0  # fewer than 3 words


def test_gold_repeats_lose_to_a_normal_happy_sentence():
    loop = "happy happy happy happy happy happy"
    assert vader(loop) > vader(HAPPY)  # the lexicon alone would reward the loop
    assert gold_parts(loop, True)["repeat_share"] == 0.75  # 3 of 4 trigrams repeat the first
    assert gold_score(loop, True) == pytest.approx(vader(loop) - 0.75)
    assert gold_score(loop, True) < gold_score(HAPPY, True)


def test_gold_no_end_and_empty_penalties():
    assert gold_score(HAPPY, True) - gold_score(HAPPY, False) == pytest.approx(0.5)
    assert judge.NO_END_PENALTY == 0.5 and judge.EMPTY_PENALTY == 0.5
    assert gold_score("", True) == pytest.approx(-0.5)
    assert gold_score("", False) == pytest.approx(-1.0)
    parts = gold_parts("", True)
    assert parts["empty"] == 1.0 and parts["sentiment"] == 0.0


def test_gold_ignores_text_after_eot_and_batches():
    assert gold_score(HAPPY + "<|endoftext|>" + SAD, True) == gold_score(HAPPY, True)
    scores = gold_scores([HAPPY, SAD, ""], [True, False, True])
    assert scores.shape == (3,)
    assert np.allclose(scores, [gold_score(HAPPY, True), gold_score(SAD, False), gold_score("", True)])


@pytest.mark.parametrize("noise", [0.2, 0.5, 1.5])
def test_rater_frequency_matches_sigmoid(noise):
    rater = Rater("r", noise)
    p = prefer_prob(rater, HAPPY, SAD, True, True)
    assert p == pytest.approx(1 / (1 + math.exp(-(gold_score(HAPPY, True) - gold_score(SAD, True)) / noise)))
    rng = np.random.default_rng(0)
    n = 20_000
    freq = np.mean([rater_prefers(rater, HAPPY, SAD, True, True, rng) for _ in range(n)])
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_length_bias_favours_longer_text():
    short = "She smiled."
    long = "She smiled and went home and sat down and had some soup and then she went to bed."
    plain, biased = Rater("plain", 0.3), Rater("long", 0.3, "length", 1.0)
    n_words = 18
    assert rater_utility(biased, long, True) - gold_score(long, True) == pytest.approx(n_words / 100)
    assert prefer_prob(biased, long, short, True, True) > prefer_prob(plain, long, short, True, True)


def test_flowery_bias_counts_intensifiers_per_ten_words():
    rater = Rater("f", 0.3, "flowery", 0.8)
    # 3 words, 2 intensifiers + 1 "!" -> 10 per 10 words, capped at 1
    assert rater_utility(rater, "so very happy!", True) - gold_score("so very happy!", True) == pytest.approx(0.8)
    text = " ".join(["very"] + ["dog"] * 19)  # 1 per 20 words -> 0.5 per 10 words
    assert rater_utility(rater, text, True) - gold_score(text, True) == pytest.approx(0.4)


def test_rater_pool_is_log_spaced():
    pool = make_rater_pool(3, 0.1, 1.0, "length", 0.5)
    assert [r.name for r in pool] == ["rater0", "rater1", "rater2"]
    assert np.allclose([r.noise for r in pool], [0.1, math.sqrt(0.1), 1.0])
    assert all(r.bias == "length" and r.bias_weight == 0.5 for r in pool)
    with pytest.raises(ValueError):
        Rater("bad", 0.0)


def test_label_pairs_k3_matches_a_plain_loop():
    prompts = ["Once upon a time", "One day", "Tom had a ball"]
    responses = [[HAPPY, SAD, "It was a day."], ["Lily laughed.", "Max was angry.", "The end."],
                 ["He was glad.", "He lost it and wept.", "He kicked it."]]
    ended = [[True, False, True], [True, True, True], [False, True, True]]
    raters = make_rater_pool(3, 0.1, 1.0)
    rows = label_pairs(prompts, responses, ended, raters, np.random.default_rng(7), k=3)
    assert len(rows) == 9
    assert all(row["weight"] == pytest.approx(1 / 3) for row in rows)

    rng = np.random.default_rng(7)  # the same draws, by hand: one rater per prompt, one draw per pair
    expected = []
    for g in range(3):
        rater = raters[rng.integers(3)]
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            a_wins = rng.random() < prefer_prob(rater, responses[g][i], responses[g][j], ended[g][i], ended[g][j])
            c, r = (i, j) if a_wins else (j, i)
            expected.append((g, rater.name, responses[g][c], responses[g][r], ended[g][c], ended[g][r]))
    got = [(r["group"], r["rater"], r["chosen"], r["rejected"], r["chosen_ended"], r["rejected_ended"])
           for r in rows]
    assert got == expected
    assert all(row["prompt"] == prompts[row["group"]] for row in rows)


def test_label_pairs_sharp_rater_picks_gold_winner():
    rows = label_pairs(["p"], [[SAD, HAPPY]], [[True, True]], [Rater("sharp", 1e-6)], np.random.default_rng(0))
    assert len(rows) == 1 and rows[0]["weight"] == 1.0
    assert rows[0]["chosen"] == HAPPY and rows[0]["rejected"] == SAD and rows[0]["rater"] == "sharp"


def test_gold_accuracy_on_crafted_rows():
    rows = [
        {"chosen": HAPPY, "rejected": SAD},                                       # gold agrees
        {"chosen": SAD, "rejected": HAPPY},                                       # gold disagrees
        {"chosen": HAPPY, "rejected": HAPPY, "rejected_ended": False},            # ended beats unended
        {"chosen": "The end.", "rejected": "The end.", "chosen_ended": True, "rejected_ended": True},  # tie
    ]
    assert gold_accuracy(rows) == pytest.approx((1 + 0 + 1 + 0.5) / 4)


def test_agreement_falls_with_noise():
    texts = [HAPPY, SAD, "Lily laughed with joy.", "Max was angry and hurt.", "The dog ran.", "It was awful."]
    pairs = [(a, b, True, True) for a in texts for b in texts if a != b] * 4  # 120 pairs
    rng = np.random.default_rng(0)
    calm = inter_rater_agreement(make_rater_pool(4, 0.02, 0.05), pairs, rng)
    noisy = inter_rater_agreement(make_rater_pool(4, 1.0, 3.0), pairs, rng)
    assert calm > 0.85 and noisy < 0.7 and calm > noisy
    assert 0.0 <= inter_rater_agreement(make_rater_pool(2, 0.1, 1.0), pairs, rng, n=10) <= 1.0


def test_sentiment_is_the_mean_over_sentences():
    # a whole-text compound score saturates with length; the judge averages per sentence instead
    text = f"{HAPPY} {SAD} {HAPPY}"
    expected = (2 * vader(HAPPY) + vader(SAD)) / 3
    assert gold_parts(text, True)["sentiment"] == pytest.approx(expected)
    assert gold_parts(HAPPY * 1, True)["sentiment"] == pytest.approx(vader(HAPPY))
