"""nanorlhf/data.py: story splitting, prompts, padding, the token cache, corpus errors, and
the resumable, checksummed download on a loopback HTTP server that speaks HTTP Range."""
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
import torch

from nanorlhf import data
from nanorlhf.data import (download, encode_prompts, encode_stories, is_validation, left_pad, load_corpus,
                           right_pad, split_prompt, split_stories, train_val_stories)
from nanorlhf.tokenizer import EOT, make_encoding


def byte_encoding(merges=()):
    """A tokenizer whose ids are the bytes (plus optional merges); EOT is the last id."""
    ranks = {bytes([i]): i for i in range(256)}
    for m in merges:
        ranks[m] = len(ranks)
    return make_encoding(ranks, f"bytes-{len(ranks)}")


# ---------------------------------------------------------------- stories and prompts

def test_split_stories_on_blank_line_paragraphs():
    text = ("Project header, not a story.\n\nStill the header.\n\n"
            "Once upon a time, there was a cat.\n\nThe cat slept.\n  \n"
            "There was a dog. It ran.\n\nOne day, the dog was sad.\n\n\n"
            "One day, a bird sang.\n\nLong ago, a king lived.\n\nThere lived a fox.\n")
    assert split_stories(text) == [
        "Once upon a time, there was a cat.\n\nThe cat slept.",
        "There was a dog. It ran.\n\nOne day, the dog was sad.",  # "One day, the" does not open a story
        "One day, a bird sang.",
        "Long ago, a king lived.",
        "There lived a fox.",
    ]


def test_split_stories_on_endoftext_is_exact():
    text = f"Once a cat.\n\nThe end.{EOT}\n  Tom ran. Then he sat.  \n{EOT}{EOT}\n{EOT}Junk is a story here."
    assert split_stories(text) == ["Once a cat.\n\nThe end.", "Tom ran. Then he sat.", "Junk is a story here."]


@pytest.mark.parametrize("story,prompt", [
    ("Once upon a time, there was a big red ball. It rolled away. Then it stopped.",
     "Once upon a time, there was a big red ball."),  # a long first sentence alone
    ("Tom ran fast. He wanted to see the big tree. It was tall.",
     "Tom ran fast. He wanted to see the big tree."),  # < 6 words: the next sentence joins
    ('Sue said, "Hi!" Then she smiled at her new friend. They played.',
     'Sue said, "Hi!" Then she smiled at her new friend.'),  # a sentence ending in a quote
    ("Tom ran.\n\nHe saw a dog by the big old tree. The end.",
     "Tom ran.\n\nHe saw a dog by the big old tree."),  # a paragraph break inside the prompt
    ("Tom ran.  He saw a big dog by the old tree. The end.",
     "Tom ran.  He saw a big dog by the old tree."),  # two spaces
    ("Tom ran. It was fun.", "Tom ran."),  # only two sentences: the first is the prompt
    ("No sentence end here", "No sentence end here"),
])
def test_split_prompt(story, prompt):
    got_prompt, response = split_prompt(story)
    assert got_prompt == prompt
    assert got_prompt + response == story  # nothing lost or doubled at the seam


def test_validation_split_is_deterministic_and_disjoint():
    stories = [f"Once upon a time there was cat number {i}. It was happy." for i in range(200)]
    text = "\n\n".join(stories)
    train, val = train_val_stories(text)
    assert (train, val) == train_val_stories(text)
    assert not set(train) & set(val) and sorted(train + val) == sorted(stories)
    # by content: sha1 of the story mod 100 < 10
    assert val == [s for s in stories if int(hashlib.sha1(s.encode()).hexdigest(), 16) % 100 < 10]
    assert 5 <= len(val) <= 40
    assert is_validation(val[0]) and not is_validation(train[0])
    with pytest.raises(ValueError, match="at least 10"):
        train_val_stories("\n\n".join(stories[:9]))
    # paragraphs that open no story: the error says what does, and the other separator
    cats = "\n\n".join(f"The cat number {i} sat." for i in range(50))
    with pytest.raises(ValueError, match=f"only 0 stories.*{EOT}.*first paragraph starting \"Once\""):
        train_val_stories(cats)
    # a small corpus that hashes no story into validation still gets one validation story
    small = stories[:10]
    assert not any(is_validation(s) for s in small)
    assert train_val_stories("\n\n".join(small)) == (small[:9], small[9:])


# ---------------------------------------------------------------- padding and prompts

def test_left_and_right_pad():
    tokens, mask = left_pad([[1, 2, 3], [4], []], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    tokens, mask = right_pad([np.array([1, 2, 3]), [4], []], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert tokens.dtype == mask.dtype == torch.long
    tokens, mask = right_pad([[], []], pad_id=9)  # all empty: still one column, all padding
    assert tokens.shape == (2, 1) and mask.sum() == 0


def test_encode_prompts_cuts_long_prompts_to_their_last_tokens_with_a_warning():
    enc = byte_encoding()
    with pytest.warns(UserWarning, match="1 of 2 prompts .* max_prompt_tokens=4"):
        ids = encode_prompts(enc, ["abcdefg", "xyz"], max_prompt_tokens=4)
    assert ids == [list(b"defg"), list(b"xyz")]


# ---------------------------------------------------------------- token cache

def test_encode_stories_caches_and_rebuilds(tmp_path, monkeypatch):
    enc = byte_encoding()
    stories = ["Tom ran. He saw a dog by the tree. It barked.", "Once upon a time, a cat sat down. The end."]
    seqs, prompt_lens = encode_stories(enc, stories, cache_dir=str(tmp_path))
    for seq, n, story in zip(seqs, prompt_lens, stories):
        prompt, response = split_prompt(story)
        assert list(seq) == list(prompt.encode()) + list(response.encode()) + [enc.eot_token]
        assert n == len(prompt.encode())
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and {f.split(".")[1] for f in files} == {"tokens", "offsets"}

    # a cache hit reads the files and never re-encodes (split_prompt would fail if called)
    monkeypatch.setattr(data, "split_prompt", lambda story: 1 / 0)
    again, again_lens = encode_stories(enc, stories, cache_dir=str(tmp_path))
    assert [list(s) for s in again] == [list(s) for s in seqs] and list(again_lens) == list(prompt_lens)
    monkeypatch.undo()

    # another corpus or another tokenizer is a new cache entry with new contents
    encode_stories(enc, stories[:1], cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 4
    merged = byte_encoding([b"Tom"])
    seqs2, _ = encode_stories(merged, stories, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 6
    assert list(seqs2[0][:2]) == [256, ord(" ")] and seqs2[0][-1] == merged.eot_token
    # so is another way of splitting prompts (a student editing split_prompt): the old lengths would be wrong
    monkeypatch.setattr(data, "SPLIT_CODE", data.SPLIT_CODE + "# edited")
    monkeypatch.setattr(data, "split_prompt", lambda story: (story[:3], story[3:]))
    _, lens3 = encode_stories(enc, stories, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 8 and list(lens3) == [3, 3]


# ---------------------------------------------------------------- corpus errors

def test_load_corpus_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dataset sample"):
        load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    with pytest.raises(ValueError, match=f"is empty: separate stories by {EOT}, or by blank lines with each "
                                         "story's first paragraph starting"):
        load_corpus(str(empty))
    with pytest.raises(IsADirectoryError, match=f"--dataset {tmp_path} is a folder: pass the path of a text file"):
        load_corpus(str(tmp_path))
    good = tmp_path / "good.txt"
    good.write_text("Once upon a time.\n")
    assert load_corpus(str(good)) == "Once upon a time.\n"


# ---------------------------------------------------------------- download (tinystories_full)

STORIES = [f"Once upon a time there was a rabbit number {i}. It liked carrots.\nThe end." for i in range(300)]
CORPUS = ("\n" + EOT + "\n").join(STORIES).encode()  # the TinyStoriesV2 format


class RangeServer:
    """A loopback HTTP server for one file; honours Range requests (206) unless told not to,
    and records the Range header of every request. range_start: a broken server that answers
    every Range request with a 206 from that byte (and says so in its Content-Range)."""

    def __init__(self, payload, honour_range=True, etag=None, content_length=True, range_start=None):
        self.payload, self.honour_range, self.ranges = payload, honour_range, []
        self.range_start = range_start
        self.etag, self.content_length, self.if_ranges = etag, content_length, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                server.if_ranges.append(self.headers.get("If-Range"))
                body, status = server.payload, 200
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range != server.etag:
                    rng = None  # another version than the client holds: the whole file (RFC 9110 13.1.5)
                if rng and server.honour_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if server.range_start is not None:
                        start = server.range_start
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body, status = body[start:], 206
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                if server.etag:
                    self.send_header("ETag", server.etag)
                if server.content_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")  # the body ends when the connection does
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/TinyStoriesV2-GPT4-train.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_download_writes_file_and_checksum(tmp_path):
    path = str(tmp_path / "corpus.txt")
    with RangeServer(CORPUS) as server:
        assert download(server.url, path, chunk=1000) == path
        assert server.ranges == [None]
        download(server.url, path)  # a verified file is not fetched again
        assert server.ranges == [None]
    assert open(path, "rb").read() == CORPUS
    assert open(path + ".sha256").read().strip() == hashlib.sha256(CORPUS).hexdigest()
    assert not os.path.exists(path + ".part")
    assert split_stories(load_corpus(path)) == STORIES


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_a_partial_file(tmp_path, honour_range):
    path = str(tmp_path / "corpus.txt")
    done = len(CORPUS) // 3
    with open(path + ".part", "wb") as f:
        f.write(CORPUS[:done])
    with RangeServer(CORPUS, honour_range) as server:
        download(server.url, path, chunk=1000)
    assert server.ranges == [f"bytes={done}-"]
    assert open(path, "rb").read() == CORPUS  # byte-identical, whether the server resumed or restarted
    assert open(path + ".sha256").read().strip() == hashlib.sha256(CORPUS).hexdigest()


def test_download_resumes_only_the_same_version_of_the_file(tmp_path):
    """The partial file came from an older version (etag "v1"): splicing the new one's tail onto it
    would be corrupt. If-Range makes the server send the new version whole."""
    path, new = str(tmp_path / "corpus.txt"), CORPUS.replace(b"carrots", b"lettuce")
    with RangeServer(CORPUS, etag='"v1"') as server:  # a first download, cut short
        download(server.url, path, chunk=1000)
    os.replace(path, path + ".part")
    with open(path + ".part", "r+b") as f:
        f.truncate(len(CORPUS) // 3)
    with open(path + ".part.etag", "w") as f:
        f.write('"v1"')
    with RangeServer(new, etag='"v2"') as server:
        download(server.url, path, chunk=1000)
    assert server.if_ranges == ['"v1"']
    assert open(path, "rb").read() == new and not os.path.exists(path + ".part.etag")
    # the same version resumes from where it stopped
    os.remove(path)
    with open(path + ".part", "wb") as f:
        f.write(new[:1000])
    with open(path + ".part.etag", "w") as f:
        f.write('"v2"')
    with RangeServer(new, etag='"v2"') as server:
        download(server.url, path)
    assert server.ranges == ["bytes=1000-"] and open(path, "rb").read() == new


def test_download_without_content_length_resumes(tmp_path):
    # a resumed response with no Content-Length once counted the file as cut short
    path = str(tmp_path / "corpus.txt")
    with open(path + ".part", "wb") as f:
        f.write(CORPUS[:5000])
    with RangeServer(CORPUS, content_length=False) as server:
        download(server.url, path, chunk=1000)
    assert open(path, "rb").read() == CORPUS


def test_download_restarts_a_part_file_longer_than_the_remote_one(tmp_path):
    path = str(tmp_path / "corpus.txt")
    with open(path + ".part", "wb") as f:
        f.write(CORPUS + b"junk from somewhere else")
    with RangeServer(CORPUS) as server:
        download(server.url, path)
    assert server.ranges == [f"bytes={len(CORPUS) + 24}-", None]
    assert open(path, "rb").read() == CORPUS


def test_download_of_a_complete_part_file_finishes_it(tmp_path):
    # a crash after the last byte but before the rename: the server answers 416 to the range
    path = str(tmp_path / "corpus.txt")
    with open(path + ".part", "wb") as f:
        f.write(CORPUS)
    with RangeServer(CORPUS) as server:
        download(server.url, path, sha256=hashlib.sha256(CORPUS).hexdigest())
    assert open(path, "rb").read() == CORPUS


def test_download_rejects_a_wrong_sha256(tmp_path):
    path = str(tmp_path / "corpus.txt")
    with RangeServer(CORPUS) as server, pytest.raises(RuntimeError, match="expected 0000"):
        download(server.url, path, sha256="0" * 64)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def test_download_refuses_a_corrupted_finished_file(tmp_path):
    path = str(tmp_path / "corpus.txt")
    with RangeServer(CORPUS) as server:
        download(server.url, path)
        with open(path, "r+b") as f:  # one flipped byte after the download was recorded
            f.seek(100)
            f.write(b"X")
        with pytest.raises(RuntimeError, match="does not match its checksum.*delete it"):
            download(server.url, path)
        assert server.ranges == [None]  # it did not silently download again


def test_download_error_names_the_way_out(tmp_path):
    with RangeServer(CORPUS) as server:
        port = server.httpd.server_address[1]
    # the server is shut down: nothing listens on that port now
    with pytest.raises(RuntimeError, match="--dataset PATH"):
        download(f"http://127.0.0.1:{port}/x.txt", str(tmp_path / "x.txt"))


def test_tinystories_full_downloads_and_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FULL_PATH", str(tmp_path / "TinyStoriesV2-GPT4-train.txt"))
    with RangeServer(CORPUS) as server:
        monkeypatch.setattr(data, "FULL_URL", server.url)
        text = load_corpus("tinystories_full")
    assert os.path.exists(tmp_path / "TinyStoriesV2-GPT4-train.txt")
    assert split_stories(text) == STORIES
    train, val = train_val_stories(text)
    assert sorted(train + val) == sorted(STORIES) and val


def test_left_pad_to_a_fixed_width():
    tokens, mask = left_pad([[1, 2], [3]], 0, width=4)
    assert tokens.tolist() == [[0, 0, 1, 2], [0, 0, 0, 3]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="does not fit a width of 2"):
        left_pad([[1, 2, 3]], 0, width=2)


def test_the_gpu_preset_takes_the_full_tinystories_once_it_is_there(tmp_path, monkeypatch):
    from nanorlhf import config
    from nanorlhf.config import PRESETS, SFTConfig, make_config
    full_path = tmp_path / "TinyStoriesV2-GPT4-train.txt"
    monkeypatch.setattr(config, "FULL_PATH", str(full_path))
    on_sample = make_config(SFTConfig, "sft", preset="gpu")
    assert on_sample.dataset == "sample" and on_sample.max_iters == PRESETS["gpu"]["sft"]["max_iters"]
    full_path.write_text("Once upon a time.<|endoftext|>")
    on_full = make_config(SFTConfig, "sft", preset="gpu")
    assert on_full.dataset == "tinystories_full"
    assert on_full.max_iters == PRESETS["gpu"]["tinystories_full"]["sft"]["max_iters"] != on_sample.max_iters
    assert on_full.tokenizer_chars == 20_000_000 and on_full.batch_size == on_sample.batch_size
    assert on_full.sft_dropout == 0.0 and on_sample.sft_dropout == 0.1  # one pass over the full corpus: no dropout
    assert make_config(SFTConfig, "sft", preset="gpu", max_iters=7).max_iters == 7  # the command line wins
    assert make_config(SFTConfig, "sft", preset="gpu", dataset="sample").max_iters == on_sample.max_iters
    assert make_config(SFTConfig, "sft", preset="cpu").dataset == "sample"  # only the gpu preset switches
