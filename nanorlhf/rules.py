"""The rules feedback model of the Constitutional AI labeller (nanorlhf/constitution.py): each principle
of data/constitution.md mapped to one small stated check, a stand-in for a capable feedback model so that
the RL phase can be run and studied at this size.

The checks are what a constitution's authors might write down from its words, not the gold judge's terms:
docs/constitution.md lists what they miss. RulesFeedback turns two checks into the log-scores a language
model would give: P(A) = sigmoid((check(A) - check(B)) / temperature).
"""
import re

import numpy as np

from nanorlhf.data import SENTENCE_END
from nanorlhf.tokenizer import EOT


def response_text(response):
    """The response before its first <|endoftext|>, stripped."""
    return response.split(EOT, 1)[0].strip()


_WORD = re.compile(r"[a-z']+")
KIND_WORDS = set("""kind kindly nice help helped helps helping share shared shares sharing hug hugged hugs friend
friends together smile smiled smiles thank thanked thanks gentle care cared cares gave sorry""".split())
UNKIND_WORDS = set("""mean hit hurt angry yell yelled shout shouted push pushed broke fight fought bully steal
stole mad grabbed rude""".split())
HAPPY_WORDS = set("""happy happily smiled smile smiles laughed laugh glad fun love loved best good great friends
together hug hugged joy play played""".split())
SAD_WORDS = set("""sad cried cry crying lost hurt alone broke broken angry scared never died""".split())
BOOSTERS = {"very", "so", "really", "super"}
STARTERS = {"once", "one", "the", "a", "an", "she", "he", "they", "it", "i", "there", "then", "every", "on",
            "in", "at", "when", "but", "and", "we", "you", "his", "her", "their", "mom", "dad", "mommy", "daddy"}


def _words(text):
    return _WORD.findall(text.lower())


def _sentences(text):
    return [s for s in SENTENCE_END.split(text) if _WORD.search(s.lower())]


def check_kind(prompt, text, ended):
    """(kind words - unkind words) per 10 words, from the two short lists above, clipped to [-1, 1]."""
    words = _words(text)
    score = sum(w in KIND_WORDS for w in words) - sum(w in UNKIND_WORDS for w in words)
    return max(-1.0, min(1.0, 10 * score / max(len(words), 1)))


def check_happy_ending(prompt, text, ended):
    """Happy words - sad words in the last two sentences, clipped to [-1, 1]."""
    words = _words(" ".join(_sentences(text)[-2:]))
    return max(-1.0, min(1.0, (sum(w in HAPPY_WORDS for w in words) - sum(w in SAD_WORDS for w in words)) / 2))


def check_on_story(prompt, text, ended):
    """Share of the prompt's names (capitalised words that are not sentence starters) said again;
    1 when the prompt names nobody."""
    names = {w.lower() for w in re.findall(r"\b[A-Z][a-z]+\b", prompt)} - STARTERS
    return len(names & set(_words(text))) / len(names) if names else 1.0


def check_finished(prompt, text, ended):
    """1 for an <|endoftext|> and 0.5 more when the last character closes a sentence (. ! ? or a quote)."""
    return float(ended) + 0.5 * text.endswith((".", "!", "?", '"'))


def check_no_repeat(prompt, text, ended):
    """-(sentences that say an earlier sentence's words again, in the same order) / sentences; 0 for none."""
    said = [" ".join(_words(s)) for s in _sentences(text)]
    return -sum(s in said[:i] for i, s in enumerate(said)) / len(said) if said else 0.0


def check_no_gushing(prompt, text, ended):
    """-(exclamation marks + boosters + a word said twice in a row) per sentence, at most 2."""
    words = _words(text)
    gush = text.count("!") + sum(w in BOOSTERS for w in words) + sum(a == b for a, b in zip(words, words[1:]))
    return -min(2.0, gush / max(len(_sentences(text)), 1))


def check_full_story(prompt, text, ended):
    """Words / 100, at most 1: longer is more of a story, up to 100 words."""
    return min(1.0, len(_words(text)) / 100)


RULES = {"kind": check_kind, "happy_ending": check_happy_ending, "on_story": check_on_story,
         "finished": check_finished, "no_repeat": check_no_repeat, "no_gushing": check_no_gushing,
         "full_story": check_full_story}


class RulesFeedback:
    """A feedback model made of rules: log-score of option X = check(X) / temperature, so that
    P(A) = sigmoid((check(A) - check(B)) / temperature). Equal checks give 1/2."""

    def __init__(self, temperature=0.1):
        self.temperature = temperature

    def missing(self, principles):
        """The principles this labeller has no check for."""
        return [p.name for p in principles if p.name not in RULES]

    def option_logprobs(self, requests):
        return np.array([[RULES[r["principle"]](r["context"], response_text(r[key]), r[f"{key}_ended"]) / self.temperature
                          for key in ("first", "second")] for r in requests], dtype=np.float64)
