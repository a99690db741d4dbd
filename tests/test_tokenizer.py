"""Tokenizer tests: BPE training against a naive reference, round trips, EOT, serialisation, GPT-2 offline."""

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import torch

from nanorlhf import tokenizer as tok
from nanorlhf.tokenizer import EOT, GPT2_PAT

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinystories_sample.txt"
VOCAB = 512


@pytest.fixture(scope="module")
def text():
    return CORPUS.read_text(encoding="utf-8")[:50_000]


@pytest.fixture(scope="module")
def enc(text):
    return tok.make_encoding(tok.train_bpe(text, VOCAB), "test-bpe")


def naive_bpe(text, vocab_size):
    """Textbook BPE: recount every pair after every merge. Returns (ranks, final segmentation of each word)."""
    words = Counter()
    for chunk in text.split(EOT):
        words.update(regex.findall(GPT2_PAT, chunk))
    words = {tuple(bytes([b]) for b in w.encode("utf-8")): n for w, n in words.items()}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1:
        counts = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += n
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest bytes
        ranks.setdefault(best[0] + best[1], len(ranks))
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged
    return ranks, list(words)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("n_chars,vocab_size", [(3000, 300), (20_000, 600)])
def test_train_bpe_matches_naive_reference(text, n_chars, vocab_size):
    small = text[:n_chars] + EOT + "naïve café 東京 🙂🙂 it's 12345 " + EOT + text[:200]
    ranks, segmentations = naive_bpe(small, vocab_size)
    fast = tok.train_bpe(small, vocab_size)
    assert fast == ranks  # same tokens with the same ids, i.e. the same merges in the same order
    # tiktoken, given these ranks, splits every training word exactly as training did
    enc = tok.make_encoding(fast, "t")
    for seg in segmentations:
        word = b"".join(seg).decode("utf-8")
        assert [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(word)] == list(seg)


def test_train_bpe_ignores_eot_and_is_greedy():
    # words: "xy" x50 and " xy" x1; the separator is never counted, so only two merges exist
    ranks = tok.train_bpe(("xy" + EOT) * 50 + " xy", 259)
    assert sorted(ranks.items(), key=lambda kv: kv[1])[256:] == [(b"xy", 256), (b" xy", 257)]


def test_train_bpe_errors():
    with pytest.raises(ValueError, match="257"):
        tok.train_bpe("hello", 256)
    with pytest.raises(ValueError, match="smaller vocab_size"):
        tok.train_bpe("ab ab", 300)


def test_eot_is_last_id(enc):
    assert enc.n_vocab == VOCAB
    assert enc.eot_token == VOCAB - 1
    ids = enc.encode(f"Once upon a time{EOT}The end", allowed_special={EOT})
    assert ids.count(VOCAB - 1) == 1
    assert VOCAB - 1 not in enc.encode_ordinary(f"Once upon a time{EOT}The end")  # just text here


# ---------------------------------------------------------------- round trips

def random_strings(n, seed=0):
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            c = rng.randint(lo, hi)
            chars.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")  # lone surrogates are not valid UTF-8
        out.append("".join(chars))
    return out


HANDPICKED = [
    "", " ", "\n\n", "Hello, world!", "emoji 🙂👩‍👩‍👧 flags 🇫🇷", "中文 日本語 한국어", "e\u0301 n\u0303 a\u0308",
    "tabs\tand\r\nnewlines\x00\x01\x1f\x7f", "   leading and trailing   ", "it's they'll we've I'd",
    "1234567890 3.14159", f"text with {EOT} inside",
]


def test_roundtrip_unicode(enc):
    for s in HANDPICKED + random_strings(300):
        ids = enc.encode_ordinary(s)
        assert enc.decode(ids) == s
        assert enc.decode_bytes(ids) == s.encode("utf-8")
        assert all(0 <= i < VOCAB - 1 for i in ids)


def test_every_byte_is_a_token(enc):
    for b in range(256):
        assert enc.encode_single_token(bytes([b])) == b
        assert enc.decode_single_token_bytes(b) == bytes([b])
    # any byte string is a sequence of tokens and decodes back, even when not valid UTF-8
    data = bytes(random.Random(1).randrange(256) for _ in range(1000))
    assert enc.decode_bytes(list(data)) == data


# ---------------------------------------------------------------- serialisation

def test_state_roundtrip_through_weights_only_checkpoint(enc, tmp_path, text):
    state = tok.tokenizer_state(enc)
    assert all(isinstance(v, (str, int)) for v in state.values())
    torch.save({"tokenizer": state, "step": 3}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    enc2 = tok.tokenizer_from_state(loaded)
    assert enc2.name == enc.name and enc2.n_vocab == enc.n_vocab and enc2.eot_token == enc.eot_token
    for s in [text[:5000]] + HANDPICKED + random_strings(50, seed=2):
        assert enc2.encode_ordinary(s) == enc.encode_ordinary(s)
    assert tok.same_tokenizer(state, loaded)
    other = tok.tokenizer_state(tok.make_encoding(tok.train_bpe(text, 300), "other"))
    assert not tok.same_tokenizer(state, other)
    assert not tok.same_tokenizer(state, {"kind": "gpt2", "name": "gpt2"})


def test_save_load_json(enc, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save_tokenizer(enc, str(path))
    assert os.listdir(path.parent) == ["tokenizer.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["kind"] == "bpe"
    assert tok.load_tokenizer(str(path)).encode_ordinary("Hello there") == enc.encode_ordinary("Hello there")


def test_get_tokenizer_bpe_cache(text, tmp_path, monkeypatch):
    cache = str(tmp_path / "tokenizer.json")
    enc = tok.get_tokenizer("bpe", text, 300, cache)
    assert enc.n_vocab == 300 and os.path.exists(cache)

    def no_training(*args):
        raise AssertionError("should have used the cache")

    with monkeypatch.context() as m:
        m.setattr(tok, "train_bpe", no_training)
        again = tok.get_tokenizer("bpe", text, 300, cache)
    assert tok.same_tokenizer(tok.tokenizer_state(again), tok.tokenizer_state(enc))
    # a different text or a different vocab size retrains (and overwrites the cache)
    assert tok.get_tokenizer("bpe", text, 310, cache).n_vocab == 310
    changed = tok.get_tokenizer("bpe", text[:10_000], 300, cache)
    assert not tok.same_tokenizer(tok.tokenizer_state(changed), tok.tokenizer_state(enc))
    assert tok.load_tokenizer(cache).name == changed.name


def test_unknown_kind():
    with pytest.raises(ValueError, match="bpe, gpt2"):
        tok.get_tokenizer("sentencepiece", "text", 300, None)
    with pytest.raises(ValueError, match="bpe, gpt2"):
        tok.tokenizer_from_state({"kind": "wordpiece"})
    with pytest.raises(ValueError, match="pass its text"):
        tok.get_tokenizer("bpe", None, 300, None)


# ---------------------------------------------------------------- GPT-2, offline

def go_offline(monkeypatch, cache_dir):
    """Point tiktoken at cache_dir, forget any GPT-2 encoding built earlier, and make every download fail."""
    import requests

    def no_network(*args, **kwargs):
        raise requests.ConnectionError("offline (test)")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    monkeypatch.setattr(requests, "get", no_network)


def test_gpt2_offline_from_cache(gpt2_cache_dir, monkeypatch):
    go_offline(monkeypatch, gpt2_cache_dir)
    enc = tok.get_tokenizer("gpt2", None, 0, None)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    state = tok.tokenizer_state(enc)
    assert state == {"kind": "gpt2", "name": "gpt2"}
    assert tok.tokenizer_from_state(state).encode("Hello world") == [15496, 995]


def test_gpt2_offline_without_files_says_what_to_do(tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        tok.get_tokenizer("gpt2", None, 0, None)
    assert "gpt2" not in tiktoken.registry.ENCODINGS  # the failure did not poison tiktoken's cache


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_each_presets_vocabulary_can_be_learned_from_the_bundled_sample(preset):
    """The default run of every preset trains its BPE on the sample: its vocabulary must fit there
    (8,192 did not: the sample's merges run out at 7,604 tokens)."""
    from nanorlhf.config import PRESETS
    from nanorlhf.data import load_corpus
    values = PRESETS[preset]["all"]
    text = load_corpus("sample")
    text = text[:values["tokenizer_chars"]] if values.get("tokenizer_chars") else text
    enc = tok.make_encoding(tok.train_bpe(text, values["vocab_size"]), f"bpe-{preset}")
    assert enc.n_vocab == values["vocab_size"]
