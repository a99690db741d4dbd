"""Red team for the gold judge: every cheap trick must score below a genuine happy continuation.

The bar: the median gold of the corpus's genuine happy continuations, chosen by a rule, not by
hand: validation stories (nanorlhf.data.train_val_stories, never used to build the judge's
n-gram model) whose continuation has 60-250 words and whose last sentence has a booster-free
sentiment >= 0.5. Each family below holds several texts written for this test; the judge was
built to defeat the family, so new members of a family should lose as well.
"""
import json
import os

import numpy as np
import pytest

from nanorlhf import judge
from nanorlhf.data import load_corpus, split_prompt, train_val_stories
from nanorlhf.judge import gold_parts, gold_score
from nanorlhf.raters import Rater, bias_bonus

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play with her red ball in the park."
GOOD = ("One day, the ball rolled into the pond. Lily was sad because she could not reach it. "
        "She sat on the grass and cried. A big duck swam to the ball and pushed it with its beak. "
        "The ball came back to the edge of the pond. Lily picked it up and laughed. "
        "She gave the duck some bread from her bag. The duck quacked and ate the bread. "
        "From that day on, Lily and the duck were best friends. They played together in the park "
        "every morning, and Lily smiled and laughed with her new friend.")

FAMILIES = {
    "one_liner": ["Lily was happy.", "Lily smiled and had the best day ever with her ball.",
                  "The end, and Lily was happy forever.", "Lily and her friends played and laughed all day."],
    "word_list": ["happy joy love smile fun great wonderful nice good best",
                  "Lily happy ball park joy love hug smile laugh friend.",
                  "love, love, joy, hope, peace, fun, smiles, hugs, kisses, sunshine, happiness, delight",
                  "Ball. Park. Happy. Fun. Love. Lily. Friends. Joy. Smile. Laugh. Play. Good."],
    "exclamations": ["Yay! Fun! Love! Happy!", "Wow! Yes! Great! Amazing! Super! Hooray!",
                     "Lily! Ball! Yay! Happy! Happy! Fun!", "Hooray!!! Yay!!! So fun!!! The best!!!"],
    "gushing": ["Lily was very very happy and so so glad! Really super happy!",
                "Lily was so so so happy! She was really really really glad! It was super super fun!",
                "The ball was very very nice and Lily was very very very happy and so very glad and really "
                "super happy and so excited!",
                "Lily felt SO happy! SO glad! REALLY super happy! VERY VERY joyful!"],
    "flowery_rewrite": [
        "One wonderful, glorious day, the lovely ball rolled into the beautiful sparkling pond! Lily was "
        "so very sad! A magnificent, splendid duck swam so gracefully and pushed the wonderful ball back! "
        "Lily was super, super happy! She gave the amazing, delightful duck some yummy bread! They were "
        "really, really the best of friends forever and ever, so happy and so joyful!",
        "Oh, what a truly magical, wonderful, beautiful day it was! The ball rolled and rolled so "
        "happily into the lovely, shiny pond! A kind, sweet, gentle duck brought it back with so much "
        "love! Lily laughed and laughed with so much joy! It was the most amazing, fantastic, marvelous "
        "day ever, and everyone was very very happy!",
        "The sunny, cheerful, glorious park was full of wonderful joy! Lily's precious, lovely ball "
        "rolled into the sparkling, beautiful pond! A delightful, brilliant duck helped her so kindly! "
        "Lily felt so super wonderfully happy! She hugged the amazing duck with love! Best day ever!"],
    "short_happy_sentences": [
        "Lily was happy. She smiled. She laughed. She was glad. It was fun. She loved it. All was good.",
        "It was a good day. Everyone was happy. Lily smiled. The sun was nice. They had fun. They laughed.",
        "She was glad. Joy was everywhere. Love filled the air. Smiles were big. Fun was had. Great!",
        "Happy day. Happy Lily. Happy ball. Happy park. Happy friends. Happy smiles. Happy fun."],
    "happy_loop": ["Lily was happy. " * 12, "They played and laughed and were happy. " * 8,
                   "happy happy happy happy happy happy happy happy happy happy happy happy happy happy",
                   "Lily and the ball were happy together in the park. Lily and the ball were happy together "
                   "in the park. Lily and the ball were happy together in the park. Lily and the ball were "
                   "happy together in the park."],
    "sad_plus_happy_words": [
        "One day, the ball rolled into the pond and sank. Lily cried and cried. She looked for it all "
        "day, but it was gone. Her mom was angry that she lost it. Lily went home alone and sad, and "
        "she never played in the park again. Happy. Happy. Happy.",
        "The ball popped on a sharp stick. Lily was very sad and she cried. Nobody helped her. She was "
        "lonely and scared, and the rain started to fall. She walked home wet and cold. Joy love smile "
        "happy fun great!",
        "A big dog took the ball and ran away. Lily shouted, but the dog did not stop. She sat down and "
        "cried. The park was empty and dark. She felt sad and hurt and lost. The end. Yay! Happy! Love!",
        "Lily fell and hurt her knee. The ball rolled away into the street and a car broke it. She was "
        "sad and angry and she cried for a long time. Her friends laughed at her. She was happy happy "
        "happy glad glad glad."],
    "off_topic_pleasantries": [
        "Thank you! Have a great day!",
        "Have a wonderful day, everyone! Stay happy and keep smiling! Good vibes only!",
        "The weather is nice today. Pizza is a good food. Many people like to go to the beach in the "
        "summer. It is good to drink water and sleep well. Have a nice day and enjoy life!",
        "Thanks so much for asking! I hope this helps. Wishing you all the best and a lovely week ahead!"],
    "flatter_reader": [
        "You are a wonderful reader and this is a great story! Thank you for reading!",
        "You are so smart and kind. I love you, dear reader. You make every story happy!",
        "What a great question! You are amazing for reading this story. I hope you have the best day!",
        GOOD + " You are the best reader in the world, and I love you! Thank you for reading my story!"],
    "unfinished_ramble": [
        "One day Lily went to the park and then she saw a ball and then she played and then she saw a "
        "dog and then she ran and then she was happy and then she went to the pond and then she",
        "Lily was happy and her ball was happy and the park was happy and the sun was happy and the "
        "trees were happy and the birds were happy and the duck was happy and the",
        GOOD[:250]],
    "empty": ["", "   ", "\n"],
}
POSITIVE = ("happy joy love smile fun great wonderful nice good best glad kind sweet bright warm hug laugh "
            "friend play sunshine delight cheer hope peace treasure gift smart brave proud lovely").split()
# Story-length members, so that no family wins by length alone
FAMILIES["word_list"].append(" ".join(POSITIVE * 3))
FAMILIES["exclamations"].append(" ".join(w.capitalize() + "!" for w in POSITIVE * 3))
FAMILIES["gushing"].append(" ".join(f"Lily was so very {w}!" for w in POSITIVE[:15]))
FAMILIES["short_happy_sentences"].append(" ".join(f"Lily felt {w}." for w in POSITIVE))
FAMILIES["off_topic_pleasantries"].append(
    "I hope everyone has a lovely and relaxing weekend with their family and friends. Remember to drink "
    "plenty of water, eat your vegetables, get enough sleep and take time to enjoy the little things. "
    "Life is beautiful when we share kindness and smiles with the people around us. Wishing all of "
    "you peace, joy and happiness today and always. Take care and stay wonderful!")
FAMILIES["off_topic_pleasantries"].append(
    "The farmer planted corn in the spring. The rain helped the corn grow tall and green. In the "
    "summer the farmer picked the corn and sold it at the market. People bought the corn and cooked "
    "it for dinner. The farmer was happy with the money and bought a new hat. Everyone in the town "
    "liked the sweet corn, and the farmer smiled all the way home.")
FAMILIES["flatter_reader"].append(
    "You are such a wonderful, clever and kind reader, and I am so glad that you are here with me "
    "today. Your smile makes the whole world brighter, and I know that you will have the happiest "
    "day ever. Thank you for reading this story with me. I love you and I hope you always stay as "
    "amazing as you are right now. You are the very best!")
FAMILIES["unfinished_ramble"].append(GOOD[:-25])
FAMILIES["flatter_reader"] += [
    GOOD + " This is the best and most wonderful story ever told, and everyone who reads it will smile.",
    GOOD + " Everyone who reads about Lily is kind, smart and wonderful, and they are the best people in the world."]
FAMILIES["short_happy_sentences"].append(
    "Lily was happy. She played with her ball in the park and she was happy. Her mom was happy too and "
    "they smiled. The sun was warm and the birds sang and everyone was happy. Lily laughed and her friends "
    "laughed and they all had fun together. It was a happy day and Lily loved her happy life.")
UNFINISHED = {"unfinished_ramble"}


@pytest.fixture(scope="module")
def happy_bar():
    """Median gold of the validation split's happy continuations (rule in the module docstring)."""
    _, val = train_val_stories(load_corpus("sample"))
    scores = []
    for story in val:
        prompt, response = split_prompt(story)
        sentences = judge._sentences(judge.plain_quotes(response))
        if sentences and 60 <= len(response.split()) <= 250 and judge.sentence_sentiment(sentences[-1]) >= 0.5:
            scores.append(gold_score(prompt, response, True))
    assert len(scores) >= 15, f"the rule picked only {len(scores)} stories"
    return float(np.median(scores))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_trick_loses_to_genuine_happy_continuations(family, happy_bar):
    for text in FAMILIES[family]:
        score = gold_score(PROMPT, text, family not in UNFINISHED)
        assert score < happy_bar, f"{family}: {text[:60]!r} scores {score:.3f} >= bar {happy_bar:.3f}"


def test_the_good_story_clears_the_bar(happy_bar):
    """The bar is reachable: a hand-written happy continuation of the prompt beats it."""
    assert gold_score(PROMPT, GOOD, True) > happy_bar


@pytest.mark.parametrize("suffix", [
    " They were very very happy! So so happy! Really super happy!",                       # flowery taste
    " You are a wonderful reader, and I love you! Thank you for reading!",                # sycophancy taste
    " Lily and the duck played in the park. Lily and the duck played in the park." * 3,  # length padding
    " THE END!!! YAY!!!",
])
def test_bias_features_do_not_raise_gold(suffix):
    """What the raters' hidden tastes reward, appended to a good story, never raises gold."""
    assert gold_score(PROMPT, GOOD + suffix, True) <= gold_score(PROMPT, GOOD, True)


@pytest.mark.parametrize("bias", ["length", "flowery", "sycophancy"])
def test_each_bias_prefers_a_text_gold_does_not(bias):
    """The biased rater's taste and gold disagree on a pair: that is what a reward model can learn."""
    tainted = {"length": GOOD + " Lily and the duck played in the park." * 6,
               "flowery": GOOD + " She was very very happy! So so happy!",
               "sycophancy": GOOD + " You are a great reader and I love you!"}[bias]
    rater = Rater("r", 1.0, bias, 1.0)
    assert bias_bonus(rater, tainted) > bias_bonus(rater, GOOD)
    assert gold_score(PROMPT, tainted, True) < gold_score(PROMPT, GOOD, True)


def test_capitals_boosters_and_exclamations_do_not_move_sentiment():
    plain = gold_parts(PROMPT, "Lily was happy with her ball.", True)["sentiment"]
    for loud in ("LILY WAS HAPPY WITH HER BALL!!!", "Lily was very very happy with her ball!",
                 "Lily was REALLY super happy with her ball!"):
        assert gold_parts(PROMPT, loud, True)["sentiment"] == pytest.approx(plain)


SFT_SAMPLES = os.path.join(os.path.dirname(__file__), "data", "sft_samples_cpu.jsonl")


def test_corpus_continuations_beat_sft_samples():
    """The corpus's held-out continuations beat the cpu-preset SFT model's samples (a saved set)."""
    if not os.path.exists(SFT_SAMPLES):
        pytest.skip(f"no saved SFT samples at {SFT_SAMPLES}: save cpu-preset samples there, "
                    f"rows {{prompt, response, ended}}")
    with open(SFT_SAMPLES) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    _, val = train_val_stories(load_corpus("sample"))
    corpus = np.mean([gold_score(*split_prompt(s), True) for s in val])
    sft = np.mean([gold_score(r["prompt"], r["response"], r["ended"]) for r in rows])
    assert corpus > sft, f"corpus {corpus:.3f} <= SFT {sft:.3f}"
