"""Corpus -> stories -> (prompt, response) -> token batches.

A story's prompt is its first sentence (two if the first is very short); its
response is the rest of the story, ending with <|endoftext|>. Prompts are left
padded, responses right padded, so every response starts in the same column.
"""
import hashlib
import inspect
import os
import re
import sys
import urllib.request
import warnings

import numpy as np
import torch

from nanorlhf.io import atomic_write
from nanorlhf.tokenizer import EOT, tokenizer_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "data")
SAMPLE = os.path.join(DATA_DIR, "tinystories_sample.txt")
# The full TinyStories (Eldan & Li 2023, CDLA-Sharing-1.0), stories separated by <|endoftext|>.
FULL_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"
FULL_PATH = os.path.join(DATA_DIR, "TinyStoriesV2-GPT4-train.txt")
# A paragraph that opens a new story in the blank-line separated sample.
STORY_OPENING = re.compile(r"^(Once\b|There (once )?(was|were|lived)\b|Long ago\b|One day, (a|an|there)\b)")
# What split_stories recognises, said in the corpus errors so that they tell the fix
CORPUS_FORMAT = (f"separate stories by {EOT}, or by blank lines with each story's first paragraph starting "
                 f"\"Once\", \"There (once) was/were/lived\", \"Long ago\" or \"One day, a/an/there\" "
                 f"(other paragraphs join the story before them)")
SENTENCE_END = re.compile(r'(?<=[.!?])\s+|(?<=[.!?]["”])\s+')


def corpus_path(dataset):
    if dataset in ("sample", "auto"):  # make_config resolves auto; a config built by hand reads the sample
        return SAMPLE
    if dataset == "tinystories_full":
        return download(FULL_URL, FULL_PATH)
    return dataset  # a path to the user's own text file


def load_corpus(dataset):
    path = corpus_path(dataset)
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus file {path} not found: use --dataset sample (bundled), "
                                f"--dataset tinystories_full (downloads), or the path of a text file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--dataset {path} is a folder: pass the path of a text file of stories")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty: {CORPUS_FORMAT}")
    return text


def split_stories(text):
    """Stories of a corpus. With <|endoftext|> separators (the full TinyStories files)
    that is exact; in the blank-line sample a story starts at a paragraph that opens one
    ("Once upon a time", "There was", ...), and text before the first opening is skipped."""
    if EOT in text:
        return [s.strip() for s in text.split(EOT) if s.strip()]
    stories = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        if STORY_OPENING.match(para):
            stories.append(para)
        elif stories:
            stories[-1] += "\n\n" + para
    return stories


def split_prompt(story, min_words=6):
    """(prompt, response): the first sentence (plus the next if it has < min_words words), the rest."""
    gaps = [m.start() for m in SENTENCE_END.finditer(story)][:2]  # where sentences 1 and 2 end
    if not gaps:
        return story, ""
    n = 2 if len(gaps) > 1 and len(story[:gaps[0]].split()) < min_words else 1
    # cut the story itself, so prompt + response == story whatever whitespace lies between sentences
    return story[:gaps[n - 1]], story[gaps[n - 1]:]


# the prompt/response split as code: part of the token cache's key, so that an edited split re-tokenises
SPLIT_CODE = inspect.getsource(split_prompt) + SENTENCE_END.pattern


def is_validation(story, val_percent=10):
    """Deterministic held-out split by story content (stable when the corpus grows)."""
    return int(hashlib.sha1(story.encode()).hexdigest(), 16) % 100 < val_percent


def train_val_stories(text):
    stories = split_stories(text)
    if len(stories) < 10:
        raise ValueError(f"the corpus has only {len(stories)} stories; nanorlhf needs at least 10: "
                         f"{CORPUS_FORMAT}")
    val = [s for s in stories if is_validation(s)]
    train = [s for s in stories if not is_validation(s)]
    if not val:  # a small corpus may hash no story into validation: hold out the last one
        val, train = train[-1:], train[:-1]
    return train, val


# ---------------------------------------------------------------------------
# tokenised stories, cached on disk and rebuilt when the corpus or tokenizer changes

def encode_stories(enc, stories, cache_dir=os.path.join(DATA_DIR, "cache")):
    """Each story as prompt + response + <|endoftext|> tokens, and each prompt's length.
    Returns (list of int arrays, prompt_lengths array). Cached as a flat memmap."""
    h = hashlib.sha256()  # the corpus, the tokenizer and the split decide the cached tokens
    for story in stories:  # story by story: the full corpus is 2 GB, no need to copy it whole
        h.update(story.encode() + b"\x00")
    h.update((repr(sorted(tokenizer_state(enc).items())) + SPLIT_CODE).encode())
    key = h.hexdigest()[:16]
    tok_path, off_path = (os.path.join(cache_dir, f"{key}.{x}.npy") for x in ("tokens", "offsets"))
    if not (os.path.exists(tok_path) and os.path.exists(off_path)):
        if len(stories) > 100_000:
            print(f"tokenising {len(stories):,} stories (once: cached in {cache_dir})", flush=True)
        seqs, prompt_lens = [], []
        for story in stories:
            prompt, response = split_prompt(story)
            p = enc.encode_ordinary(prompt)
            # 4 bytes a token now, not a python int's 28 + 8: the full TinyStories is ~470M tokens
            seqs.append(np.array(p + enc.encode_ordinary(response) + [enc.eot_token], dtype=np.uint32))
            prompt_lens.append(len(p))
        lengths = np.array([len(s) for s in seqs])
        offsets = np.stack([np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths, prompt_lens], 1)
        flat = np.concatenate(seqs)
        atomic_write(tok_path, lambda f: np.save(f, flat))
        atomic_write(off_path, lambda f: np.save(f, offsets))
    flat = np.load(tok_path, mmap_mode="r")
    offsets = np.load(off_path)
    return [flat[o:o + n] for o, n, _ in offsets], offsets[:, 2].copy()


def left_pad(seqs, pad_id, device="cpu", width=None):
    """List of token lists -> (B, P) tokens padded on the left with pad_id, and the mask.
    P is the longest list, or width (a fixed shape, as a CUDA graph or compiled step wants), and at
    least 1: with only empty prompts, the pad column is what the first response token is predicted from."""
    longest = max(len(s) for s in seqs)
    if width is not None and width < longest:
        raise ValueError(f"a sequence of {longest} tokens does not fit a width of {width}")
    width = max(longest, 1) if width is None else width
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            tokens[i, width - len(s):] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            mask[i, width - len(s):] = 1
    return tokens.to(device), mask.to(device)


def right_pad(seqs, pad_id, device="cpu"):
    """List of token lists -> (B, N) tokens padded on the right with pad_id, and the mask."""
    width = max(max(len(s) for s in seqs), 1)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            tokens[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            mask[i, :len(s)] = 1
    return tokens.to(device), mask.to(device)


def encode_prompts(enc, prompts, max_prompt_tokens):
    """Token lists of prompts, each cut to its last max_prompt_tokens tokens with a warning."""
    out, cut = [], 0
    for p in prompts:
        ids = enc.encode_ordinary(p)
        if len(ids) > max_prompt_tokens:
            ids, cut = ids[-max_prompt_tokens:], cut + 1
        out.append(ids)
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts were longer than max_prompt_tokens={max_prompt_tokens} "
                      f"and were cut to their last {max_prompt_tokens} tokens")
    return out


def story_batch(seqs, prompt_lens, rows, block_size, pad_id, loss_on_response):
    """SFT batch of whole stories, right padded: inputs x, targets y, loss mask (B, T).
    Stories longer than block_size + 1 tokens are cut."""
    chunks = [np.asarray(seqs[i][:block_size + 1], dtype=np.int64) for i in rows]
    tokens, mask = right_pad(chunks, pad_id)
    x, y, loss_mask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].clone()
    if loss_on_response:  # targets inside the prompt do not count
        for b, i in enumerate(rows):
            loss_mask[b, :max(int(prompt_lens[i]) - 1, 0)] = 0
    return x, y, loss_mask


# ---------------------------------------------------------------------------

def download(url, path, sha256=None, chunk=1 << 20):
    """Download url to path with a progress line, resuming a partial path.part (HTTP Range; with
    If-Range, so that a file changed on the server since is fetched whole rather than spliced),
    then check the sha256 (given, or recorded in path.sha256 on the first download)."""
    if os.path.exists(path) and _verify(path, sha256):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part, etag_path = path + ".part", path + ".part.etag"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    if done and os.path.exists(etag_path):  # the version the partial file holds (if the server named one)
        with open(etag_path) as f:
            etag = f.read().strip()
        if etag:
            headers["If-Range"] = etag
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except OSError as e:
        if not (done and getattr(e, "code", None) == 416):
            raise RuntimeError(f"could not download {url} ({e}). It needs internet; or put the file at {path}, "
                               f"or pass --dataset PATH to a local text file") from e
        # 416: nothing past the partial file. Whole if its size is the server's ("bytes */SIZE"); else start again
        size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        if size.isdigit() and int(size) != done:
            os.remove(part)
            return download(url, path, sha256, chunk)
        response = None
    if response is not None:
        with response:
            start = _range_start(response) if done and response.status == 206 else 0
            if start not in (0, done):  # resumed from another byte than asked: splicing would corrupt the file
                response = None
            else:
                if start != done:  # the server sends the file from its first byte: start again with it
                    done = 0
                if not done:  # a new download: remember which version it is
                    etag = response.headers.get("ETag")
                    atomic_write(etag_path, lambda f: f.write((etag or "").encode()))
                _receive(response, part, done, chunk, url)
        if response is None:
            print(f"{url} resumed from byte {start}, not {done}: downloading it again from the start",
                  file=sys.stderr)
            os.remove(part)
            return download(url, path, sha256, chunk)
    _check_corpus(part, url, path)
    digest = _sha256(part)
    if sha256 and digest != sha256:
        os.remove(part)
        raise RuntimeError(f"{url} has sha256 {digest}, expected {sha256}: the partial file was removed, "
                           f"run again")
    os.replace(part, path)
    atomic_write(path + ".sha256", lambda f: f.write(digest.encode()))
    if os.path.exists(etag_path):
        os.remove(etag_path)
    return path


def _range_start(response):
    """The first byte a 206 response holds, from its Content-Range "bytes START-END/SIZE" (None if absent)."""
    m = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range") or "")
    return int(m.group(1)) if m else None


def _check_corpus(part, url, path, head=1 << 16):
    """Refuse a body that is not a story corpus (an HTML error or login page, binary data) before its
    checksum is recorded as trusted: it must be UTF-8 text with stories split by <|endoftext|> or blank lines."""
    with open(part, "rb") as f:
        start = f.read(head)
    text = None
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = start[:len(start) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    what = None
    if not start.strip():
        what = "an empty file"
    elif text is None or "\x00" in text:
        what = "not UTF-8 text"
    elif re.match(r"\s*<(!doctype|html|\?xml|head|body)\b", text, re.I):
        what = "an HTML page"
    elif not split_stories(text):
        what = "text without stories"
    if what:
        for leftover in (part, part + ".etag"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise RuntimeError(f"{url} sent {what}, not the story corpus ({CORPUS_FORMAT}); nothing was saved. "
                           f"Check the URL and your network (a proxy or login page?), or put the file at {path}")


def _receive(response, part, done, chunk, url):
    """Append the body of response to part (which holds done bytes), with a progress line."""
    if done and response.status != 206:  # the server ignored the range, or the file changed: start again
        done = 0
    length = response.headers.get("Content-Length")  # absent on some servers: then the size is unknown
    total = done + int(length) if length is not None else None
    name = os.path.basename(part).removesuffix(".part")
    of = f" / {total / 2**20:.1f}" if total else ""
    with open(part, "ab" if done else "wb") as f:
        while block := response.read(chunk):
            f.write(block)
            done += len(block)
            print(f"\rdownloading {name}: {done / 2**20:.1f}{of} MiB", end="", file=sys.stderr, flush=True)
        f.flush()
        os.fsync(f.fileno())
    print(file=sys.stderr)
    if total is not None and done != total:
        raise RuntimeError(f"download of {url} stopped at {done} of {total} bytes; run again to resume")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _verify(path, sha256):
    """A finished download is trusted when its checksum matches the expected or recorded one."""
    recorded = sha256
    if recorded is None and os.path.exists(path + ".sha256"):
        with open(path + ".sha256") as f:
            recorded = f.read().strip()
    if recorded is None:
        return True  # a file the user put there by hand
    if _sha256(path) != recorded:
        raise RuntimeError(f"{path} does not match its checksum {recorded}: delete it and download again")
    return True


def load_prompts(dataset, n_eval):
    """Training prompts (the first sentences of the training stories) and n_eval held-out prompts (of the
    validation stories, repeated when there are fewer)."""
    train_stories, val_stories = train_val_stories(load_corpus(dataset))
    train_prompts = [split_prompt(s)[0] for s in train_stories]
    return train_prompts, [split_prompt(val_stories[i % len(val_stories)])[0] for i in range(n_eval)]


def selection_prompts(dataset, n):
    """n training prompts spread over the training stories: where a study chooses a setting (a KL strength) by
    gold, so that the held-out prompts that then report it played no part in the choice."""
    train, val_stories = train_val_stories(load_corpus(dataset))
    held_out = {split_prompt(s)[0] for s in val_stories}  # a common first sentence can open stories of both
    pool = [p for p in (split_prompt(s)[0] for s in train) if p not in held_out]
    return [pool[i * len(pool) // n % len(pool)] for i in range(n)]
