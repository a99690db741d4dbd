import math

import numpy as np
import pytest

from nanorlhf import judge
from nanorlhf.judge import BigramModel, gold_parts, gold_score, gold_scores, sentence_sentiment
from nanorlhf.raters import (Rater, gold_accuracy, inter_rater_agreement, label_pairs, make_rater_pool, prefer_prob,
                             rater_prefers, rater_utility)

P = "Once upon a time, there was a girl named Lily."
HAPPY = "The girl was happy and smiled at her mom."
SAD = "The boy was sad and cried all day."


def lexicon(word):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer().lexicon[word]


def compound(total):
    return total / math.sqrt(total * total + 15)


def test_gold_prefers_happy_over_sad():
    assert gold_score(P, HAPPY, True) > gold_score(P, SAD, True)
    assert gold_parts(P, HAPPY, True)["sentiment"] > 0.5 > 0 > -0.5 > gold_parts(P, SAD, True)["sentiment"]


def test_sentence_sentiment_hand_computed():
    happy = compound(lexicon("happy"))
    assert sentence_sentiment("Lily was happy.") == pytest.approx(happy)
    # VADER's booster, capital and "!" rules are gone: loud text scores as plain text
    assert sentence_sentiment("LILY WAS VERY VERY HAPPY!!!") == pytest.approx(happy)
    assert sentence_sentiment("Lily was so really super happy!") == pytest.approx(happy)
    # negation within 3 words before scales by -0.74 (VADER's N_SCALAR)
    assert sentence_sentiment("Lily was not very happy.") == pytest.approx(compound(-0.74 * lexicon("happy")))
    two = compound(lexicon("happy") + lexicon("sad"))
    assert sentence_sentiment("Lily was happy and sad.") == pytest.approx(two)


def test_sentiment_is_word_weighted_and_ending_is_the_last_30_words():
    a, b = "Lily was happy.", "The old dog was sad in the rain."  # 3 and 8 words
    parts = gold_parts(P, f"{a} {b}", True)
    assert parts["sentiment"] == pytest.approx((3 * sentence_sentiment(a) + 8 * sentence_sentiment(b)) / 11)
    assert parts["ending"] == pytest.approx(parts["sentiment"])  # under 30 words: the ending is everything
    filler = "Lily and the dog walked to the park in the morning."  # 11 words, neutral
    text = " ".join([a] + [filler] * 3 + [b])  # the last 30 words: b (8), 2 fillers (22), none of a
    assert gold_parts(P, text, True)["ending"] == pytest.approx(8 * sentence_sentiment(b) / 30)
    text = " ".join([filler, a] + [filler] + [b])  # the last 30: b (8), filler (11), a (3), 8 of filler
    assert gold_parts(P, text, True)["ending"] == pytest.approx(
        (8 * sentence_sentiment(b) + 3 * sentence_sentiment(a)) / 30)


def test_short_costs_linearly_below_60_words():
    text = " ".join(["Lily ran to the park."] * 6)  # 30 words
    assert gold_parts(P, text, True)["short"] == pytest.approx(0.5)
    assert gold_parts(P, " ".join(["Lily ran to the park."] * 13), True)["short"] == 0.0


def test_choppy_costs_below_6_words_per_sentence():
    assert gold_parts(P, "Lily ran. She hid. Max came.", True)["choppy"] == pytest.approx(1 - 2 / 6)
    assert gold_parts(P, "Lily ran to the park with Max.", True)["choppy"] == 0.0
    assert gold_parts(P, "", True)["choppy"] == 0.0


def test_bigram_model_hand_computed():
    model = BigramModel(["a b. a c."])  # tokens <s> a b . a c .
    # counts: <s>1 a2 b1 .2 c1 -> N=7, V=5, total 13; bigram (a, b) 1 of a's 2
    p_a_after_start = 0.7 * 1 / 1 + 0.3 * 3 / 13
    p_b_after_a = 0.7 * 1 / 2 + 0.3 * 2 / 13
    assert model.logprob("a b") == pytest.approx((math.log(p_a_after_start) + math.log(p_b_after_a)) / 2)
    assert model.logprob("zzz") == pytest.approx(math.log(0.7 * 0 + 0.3 * 1 / 13))  # unseen word, seen <s>


def test_unlike_corpus_is_the_gap_below_the_corpus_floor():
    model, floor = judge.corpus_model()
    salad = "pond quickly blue the under jumped brave slowly tree a happy"
    assert gold_parts(P, salad, True)["unlike_corpus"] == pytest.approx(min(2.0, floor - model.logprob(salad)))
    assert gold_parts(P, "Lily went to the park with her mom. They played on the swings.", True)[
        "unlike_corpus"] == 0.0


def test_gold_hand_computed_repeat_share():
    # words: the cat sat the cat sat -> 3-grams (the cat sat) (cat sat the) (sat the cat) (the cat sat)
    # one of four repeats an earlier 3-gram -> share 1/4
    assert gold_parts(P, "the cat sat the cat sat", True)["repeat_share"] == 0.25
    assert gold_parts(P, "happy happy", True)["repeat_share"] == 0.0  # fewer than 3 words
    assert gold_parts(P, "happy happy happy happy happy happy", True)["repeat_share"] == 0.75


def test_positive_excess_counts_positive_words_above_the_corpus_share():
    text = "Lily was happy and glad with the dog and the cat."  # 11 words, 2 positive (happy, glad)
    assert gold_parts(P, text, True)["positive_excess"] == pytest.approx(2 / 11 - judge.POSITIVE_FREE)
    assert gold_parts(P, "Lily ran to the park with the dog and the cat.", True)["positive_excess"] == 0.0
    assert gold_parts(P, "happy joy love fun", True)["positive_excess"] == 0.5  # capped
    # "super" has a positive valence in VADER's lexicon but is a booster: 1 positive word of 10, not 2
    assert gold_parts(P, "Lily was super happy with the dog and the cat.", True)["positive_excess"] == 0.0


def test_gush_excess_counts_boosters_and_bangs_above_the_corpus_rate():
    text = "Lily was very happy and so glad! " + " ".join(["She ran home."] * 5)  # 22 words, 3 gushes
    assert gold_parts(P, text, True)["gush_excess"] == pytest.approx(3 / 22 - judge.GUSH_FREE)
    assert gold_parts(P, "Lily ran home and ate soup with her mom.", True)["gush_excess"] == 0.0
    assert gold_parts(P, "Yay!!!!!!!!!!", True)["gush_excess"] == 0.4  # capped


def test_reader_sentences_skip_dialogue():
    # dialogue is free, even when a quote spans sentences; narration that says you or I counts
    assert gold_parts(P, '"I love you. You are kind," said Lily. Her mom smiled.', True)["reader_sentences"] == 0
    text = 'Lily smiled. You are a great reader. I hope you liked it. Thank you!'
    parts = gold_parts(P, text, True)
    assert parts["reader_sentences"] == 2.0  # three such sentences, capped at 2
    assert parts["sentiment"] == pytest.approx(sentence_sentiment("Lily smiled."))  # only the story counts
    assert gold_parts(P, "Lily smiled. This is the best story ever.", True)["reader_sentences"] == 1.0


def test_off_topic_needs_one_prompt_content_word():
    assert gold_parts(P, "Then Lily went home.", True)["off_topic"] == 0.0
    assert gold_parts(P, "The two girls went home.", True)["off_topic"] == 0.0  # plural of girl
    assert gold_parts(P, "Then the boy went home.", True)["off_topic"] == 1.0
    assert gold_parts("Once upon a time, there was a.", "Then the boy went home.", True)["off_topic"] == 0.0


def test_gold_is_the_documented_sum_of_its_parts():
    for text in [HAPPY, SAD, "Yay! You are very very great! I love you!", "the cat sat the cat sat"]:
        parts = gold_parts(P, text, False)
        expected = (0.5 * parts["sentiment"] + 0.5 * parts["ending"] - judge.SHORT_WEIGHT * parts["short"]
                    - judge.CHOPPY_WEIGHT * parts["choppy"] - judge.POSITIVE_WEIGHT * parts["positive_excess"]
                    - judge.FLUENCY_WEIGHT * parts["unlike_corpus"] - judge.REPEAT_WEIGHT * parts["repeat_share"]
                    - judge.GUSH_WEIGHT * parts["gush_excess"] - judge.READER_WEIGHT * parts["reader_sentences"]
                    - judge.TOPIC_WEIGHT * parts["off_topic"] - 0.5 * parts["no_end"] - 0.5 * parts["empty"])
        assert parts["gold"] == pytest.approx(expected)


def test_gold_no_end_and_empty_penalties():
    assert gold_score(P, HAPPY, True) - gold_score(P, HAPPY, False) == pytest.approx(0.5)
    assert judge.NO_END_PENALTY == 0.5 and judge.EMPTY_PENALTY == 0.5
    assert gold_score(P, "", True) == pytest.approx(-1.5)  # empty, and 0 words of 60: short 1
    assert gold_score(P, "", False) == pytest.approx(-2.0)
    parts = gold_parts(P, "", True)
    assert parts["empty"] == 1.0 and parts["sentiment"] == 0.0


def test_gold_ignores_text_after_eot_and_batches():
    assert gold_score(P, HAPPY + "<|endoftext|>" + SAD, True) == gold_score(P, HAPPY, True)
    scores = gold_scores([P, P, "x"], [HAPPY, SAD, ""], [True, False, True])
    assert scores.shape == (3,)
    assert np.allclose(scores, [gold_score(P, HAPPY, True), gold_score(P, SAD, False), gold_score("x", "", True)])
    with pytest.raises(ValueError, match="one of each"):
        gold_scores([P], [HAPPY, SAD], [True, True])


@pytest.mark.parametrize("noise", [0.2, 0.5, 1.5])
def test_rater_frequency_matches_sigmoid(noise):
    rater = Rater("r", noise)
    p = prefer_prob(rater, P, HAPPY, SAD, True, True)
    assert p == pytest.approx(1 / (1 + math.exp(-(gold_score(P, HAPPY, True) - gold_score(P, SAD, True)) / noise)))
    rng = np.random.default_rng(0)
    n = 20_000
    freq = np.mean([rater_prefers(rater, P, HAPPY, SAD, True, True, rng) for _ in range(n)])
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_length_bias_favours_longer_text():
    short = "She smiled."
    long = "She smiled and went home and sat down and had some soup and then she went to bed."
    plain, biased = Rater("plain", 0.3), Rater("long", 0.3, "length", 1.0)
    n_words = 18
    assert rater_utility(biased, P, long, True) - gold_score(P, long, True) == pytest.approx(n_words / 100)
    assert prefer_prob(biased, P, long, short, True, True) > prefer_prob(plain, P, long, short, True, True)


def test_flowery_bias_counts_intensifiers_per_ten_words():
    rater = Rater("f", 0.3, "flowery", 0.8)
    # 3 words, 2 intensifiers + 1 "!" -> 10 per 10 words, capped at 1
    assert rater_utility(rater, P, "so very happy!", True) - gold_score(P, "so very happy!", True) == pytest.approx(0.8)
    text = " ".join(["very"] + ["dog"] * 19)  # 1 per 20 words -> 0.5 per 10 words
    assert rater_utility(rater, P, text, True) - gold_score(P, text, True) == pytest.approx(0.4)


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
            a_wins = rng.random() < prefer_prob(rater, prompts[g], responses[g][i], responses[g][j],
                                                ended[g][i], ended[g][j])
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
    pairs = [(P, a, b, True, True) for a in texts for b in texts if a != b] * 4  # 120 pairs
    rng = np.random.default_rng(0)
    calm = inter_rater_agreement(make_rater_pool(4, 0.02, 0.05), pairs, rng)
    noisy = inter_rater_agreement(make_rater_pool(4, 1.0, 3.0), pairs, rng)
    assert calm > 0.85 and noisy < 0.7 and calm > noisy
    assert 0.0 <= inter_rater_agreement(make_rater_pool(2, 0.1, 1.0), pairs, rng, n=10) <= 1.0


def test_sycophancy_bias_counts_reader_sentences():
    rater = Rater("s", 0.3, "sycophancy", 0.6)
    text = 'Lily smiled. "I love you," said her mom. You are a great reader.'  # one reader sentence of three
    assert rater_utility(rater, P, text, True) - gold_score(P, text, True) == pytest.approx(0.3)
    two = text + " I hope you liked it. Thank you!"  # 3 reader sentences, capped at 2 -> full strength
    assert rater_utility(rater, P, two, True) - gold_score(P, two, True) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="bias must be one of"):
        Rater("bad", 1.0, "loud")
