"""Tokenizer: a byte-level BPE trained on our corpus, or OpenAI's GPT-2 BPE.

Byte-level BPE (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019):
start from the 256 single bytes, then repeatedly merge the most frequent adjacent
pair of tokens into a new token. Text is first split into "words" with the GPT-2
regex, so merges never cross a word boundary. Training is ours (below); encoding
and decoding are done by tiktoken, which is fast.

The tokenizer travels inside every checkpoint as a small dict of str/int
(`tokenizer_state`), so `torch.load(weights_only=True)` can read it back.
"""

import base64
import hashlib
import heapq
import json
import os
from collections import Counter, defaultdict

import regex  # a tiktoken dependency; the GPT-2 pattern needs \p{L} classes
import tiktoken

from nanorlhf.io import atomic_write

EOT = "<|endoftext|>"

# GPT-2's pre-tokenisation pattern, exactly as tiktoken's "gpt2" encoding uses it:
# contractions | letters | digits | punctuation, each with an optional leading space | whitespace
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
KINDS = ("bpe", "gpt2")


# ---------------------------------------------------------------- training

def count_words(text: str) -> dict[bytes, int]:
    """Split text into GPT-2 pre-tokens (EOT separators removed) and count each one's UTF-8 bytes."""
    counts = Counter()
    for chunk in text.split(EOT):
        counts.update(regex.findall(GPT2_PAT, chunk))
    return {word.encode("utf-8"): n for word, n in counts.items()}


def merge_pair(tokens: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    """Replace every (left to right, non-overlapping) occurrence of `pair` in `tokens` by its concatenation."""
    out, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and tokens[i] == pair[0] and tokens[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Train a byte-level BPE on `text`; returns mergeable ranks {token bytes: id}, vocab_size - 1 of them.

    Ids 0..255 are the single bytes; each merge gets the next id; the last id
    (vocab_size - 1) is left for EOT. Each step merges the pair with the highest
    count, ties broken by the smallest (left, right) bytes, so training is reproducible.
    If the merged bytes are already a token (reached by another split, e.g. "a"+"bc"
    after "ab"+"c"), the words are merged but no new id is spent.

    Speed: we count each distinct word once (weighted by its frequency) and, after a
    merge, update pair counts only in the words that contained the pair (found via a
    pair -> words index); a heap with lazy deletion finds the best pair.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOT), got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    word_counts = count_words(text)
    words = [[bytes([b]) for b in word] for word in word_counts]  # each word as a list of tokens
    freqs = list(word_counts.values())

    pair_counts = defaultdict(int)  # (left, right) -> occurrences in the corpus
    pair_words = defaultdict(set)  # (left, right) -> indices of words that (may) contain it
    for i, (tokens, freq) in enumerate(zip(words, freqs)):
        for pair in zip(tokens, tokens[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(i)
    # heap entries (-count, left, right): the smallest entry is the best pair; an entry
    # is stale (skipped) when its count no longer matches pair_counts
    heap = [(-count, *pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size - 1:
        while heap and pair_counts.get(heap[0][1:]) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            raise ValueError(
                f"text too small for vocab_size {vocab_size}: no pairs left after {len(ranks)} tokens; "
                "use a smaller vocab_size or more text")
        _, left, right = heapq.heappop(heap)
        pair = (left, right)
        ranks.setdefault(left + right, len(ranks))

        changed = set()
        for i in pair_words.pop(pair):
            tokens = words[i]
            merged = merge_pair(tokens, pair)
            if len(merged) == len(tokens):  # stale index entry: the pair left this word earlier
                continue
            for p in zip(tokens, tokens[1:]):  # remove the word's old pairs...
                pair_counts[p] -= freqs[i]
                changed.add(p)
            for p in zip(merged, merged[1:]):  # ...and add its new ones
                pair_counts[p] += freqs[i]
                pair_words[p].add(i)
                changed.add(p)
            words[i] = merged
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], *p))
            else:
                del pair_counts[p]
    return ranks


def make_encoding(ranks: dict[bytes, int], name: str) -> tiktoken.Encoding:
    """Wrap mergeable ranks in a tiktoken Encoding with EOT as the last id (len(ranks))."""
    return tiktoken.Encoding(name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


# ---------------------------------------------------------------- serialisation

def tokenizer_state(enc: tiktoken.Encoding) -> dict:
    """A dict of only str/int that rebuilds `enc`; safe inside a weights_only checkpoint."""
    if enc.name == "gpt2":
        return {"kind": "gpt2", "name": "gpt2"}
    # tiktoken's own file format: one "base64(token bytes) id" per line
    # (tiktoken has no public getter for the ranks; _mergeable_ranks is the dict it was built from)
    ranks = "\n".join(f"{base64.b64encode(token).decode()} {rank}"
                      for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]))
    return {"kind": "bpe", "name": enc.name, "ranks": ranks}


def tokenizer_from_state(state: dict) -> tiktoken.Encoding:
    """Inverse of tokenizer_state."""
    if state["kind"] == "gpt2":
        return gpt2_encoding()
    if state["kind"] == "bpe":
        ranks = {base64.b64decode(token): int(rank)
                 for token, rank in (line.split() for line in state["ranks"].splitlines())}
        return make_encoding(ranks, state["name"])
    raise ValueError(f"unknown tokenizer kind {state['kind']!r}; valid kinds: {', '.join(KINDS)}")


def same_tokenizer(state_a: dict, state_b: dict) -> bool:
    """True when two tokenizer states map text to the same ids (same kind and same ranks)."""
    return state_a["kind"] == state_b["kind"] and state_a.get("ranks") == state_b.get("ranks")


def save_tokenizer(enc: tiktoken.Encoding, path: str) -> None:
    """Write tokenizer_state(enc) as JSON, atomically (a crash never leaves a half-written file)."""
    atomic_write(path, lambda f: f.write(json.dumps(tokenizer_state(enc)).encode("utf-8")))


def load_tokenizer(path: str) -> tiktoken.Encoding:
    with open(path) as f:
        return tokenizer_from_state(json.load(f))


# ---------------------------------------------------------------- entry point

def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding; its files are downloaded once and cached in TIKTOKEN_CACHE_DIR."""
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ImportError, ValueError) as e:  # no network, no `requests`, corrupt download
        raise RuntimeError(
            f"could not load the GPT-2 tokenizer files ({type(e).__name__}: {e}). Connect to the "
            "internet once so tiktoken can download and cache them, or set TIKTOKEN_CACHE_DIR to a "
            "folder that holds the cached files (copied from a machine where it worked), "
            "or use the tokenizer kind 'bpe', trained on the corpus") from e


def get_tokenizer(kind: str, text: str | None, vocab_size: int,
                  cache_path: str | None = None) -> tiktoken.Encoding:
    """kind "bpe": a BPE of vocab_size tokens trained on text (reused from cache_path when it was
    trained on the same text and vocab_size); kind "gpt2": OpenAI's GPT-2 encoding (50257 tokens)."""
    if kind == "gpt2":
        return gpt2_encoding()
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if text is None:
        raise ValueError("tokenizer kind 'bpe' is trained on the corpus: pass its text")
    # the name records what the BPE was trained on, so a stale cache is never reused
    name = f"bpe-{vocab_size}-{hashlib.sha256(text.encode('utf-8')).hexdigest()}"
    if cache_path and os.path.exists(cache_path):
        enc = load_tokenizer(cache_path)
        if enc.name == name:
            return enc
    enc = make_encoding(train_bpe(text, vocab_size), name)
    if cache_path:
        save_tokenizer(enc, cache_path)
    return enc
