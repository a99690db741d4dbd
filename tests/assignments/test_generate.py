"""Assignment generate (nanorlhf/sampler.py, the decode loop of generate): draws, logprobs and
masks against the no-cache naive_generate and a teacher-forced forward, early-ending rows, seeds.

The model here is a stand-in without attention that keeps its own cache, so these tests need no
other assignment (nanorlhf's GPT, with its KV cache, is tested with generate in tests/test_sampler.py)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import left_padded
from nanorlhf.model import GPTConfig, response_logprobs
from nanorlhf.sampler import generate, naive_generate

V = 23
EOS = V - 1
LENGTHS = [4, 1, 6, 3]  # real prompt tokens per row, left padded to 6


def gen(seed):
    return torch.Generator().manual_seed(seed)


class CountsCache:
    """What BagOfWordsLM remembers of the tokens before: how often each one occurred."""

    def __init__(self, batch_size, vocab_size):
        self.pos = 0  # columns seen so far, as in nanorlhf's KVCache
        self.counts = torch.zeros(batch_size, vocab_size)  # (B, V)


class BagOfWordsLM(torch.nn.Module):
    """A stand-in language model without attention: the next-token logits depend on the token,
    its position id and how often each token occurred so far among the real tokens (attention_mask 1).
    With a kv_cache it keeps those counts there instead of re-reading the sequence, so a decode loop
    that forgets to feed back the token, its position or its mask column gives other draws."""

    def __init__(self, vocab_size=V, block_size=32, seed=0):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size)  # the sampler reads block_size
        g = gen(seed)
        self.token_logits = torch.randn(vocab_size, vocab_size, generator=g) * 1.5  # (V, V)
        self.position_logits = torch.randn(block_size, vocab_size, generator=g)  # (block_size, V)
        self.count_logits = torch.randn(vocab_size, vocab_size, generator=g) * 0.5  # (V, V)

    def new_kv_cache(self, batch_size, max_len, dtype=None, static_shapes=False):
        return CountsCache(batch_size, self.config.vocab_size)

    def forward(self, idx, position_ids=None, attention_mask=None, kv_cache=None):
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long)
        if position_ids is None:
            position_ids = (attention_mask[:, :past + T].cumsum(1) - 1).clamp(min=0)[:, -T:]
        real = attention_mask[:, past:past + T, None].float()  # (B, T, 1): mask of the new tokens
        counts = (F.one_hot(idx, self.config.vocab_size).float() * real).cumsum(1)  # (B, T, V)
        if kv_cache is not None:
            counts = counts + kv_cache.counts[:, None]
            kv_cache.counts, kv_cache.pos = counts[:, -1], past + T
        return self.token_logits[idx] + self.position_logits[position_ids] + counts @ self.count_logits  # (B, T, V)


class ForcedEOS(torch.nn.Module):
    """A model whose next token is EOS exactly after stop_after[b] response tokens in row b
    and never before: row b's expected mask is known by hand."""

    def __init__(self, lm, prompt_lengths, stop_after):
        super().__init__()
        self.lm, self.config = lm, lm.config
        self.prompt_lengths = torch.tensor(prompt_lengths)[:, None]  # (B, 1)
        self.stop_after = torch.tensor(stop_after)[:, None]  # (B, 1)

    def new_kv_cache(self, *args, **kwargs):
        return self.lm.new_kv_cache(*args, **kwargs)

    def forward(self, idx, position_ids=None, attention_mask=None, kv_cache=None):
        logits = self.lm(idx, position_ids, attention_mask, kv_cache).clone()  # (B, T, V)
        # the token predicted after position p is response token number p + 1 - prompt_length
        next_index = position_ids + 1 - self.prompt_lengths  # (B, T)
        logits[..., EOS] = torch.where(next_index == self.stop_after, 100.0, -100.0)
        return logits


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_generate_logprobs_equal_teacher_forced_forward(temperature):
    model = BagOfWordsLM()
    prompt, prompt_mask = left_padded(LENGTHS, V, pad_id=EOS)
    out = generate(model, prompt, prompt_mask, 10, temperature=temperature, eos_id=EOS, generator=gen(0))
    # docs/design.md detail 4: the training pass divides the logits by the same temperature
    forced = response_logprobs(model, prompt, prompt_mask, out["tokens"], out["mask"], temperature)
    assert torch.allclose(out["logprobs"], forced, atol=1e-5), (out["logprobs"] - forced).abs().max()
    # ... and the check can fail: at temperature 1 the logprobs are different
    plain = response_logprobs(model, prompt, prompt_mask, out["tokens"], out["mask"], 1.0)
    assert not torch.allclose(out["logprobs"], plain, atol=1e-3)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                     dict(temperature=1.2, top_p=0.7)])
def test_generate_equals_naive_generate(options):
    model = BagOfWordsLM(vocab_size=8, seed=1)  # small vocabulary: EOS is common, rows end at different steps
    eos = 7
    prompt, prompt_mask = left_padded(LENGTHS, 8, seed=1, pad_id=eos)
    fast = generate(model, prompt, prompt_mask, 16, eos_id=eos, generator=gen(4), check_every=3, **options)
    slow = naive_generate(model, prompt, prompt_mask, 16, eos_id=eos, generator=gen(4), **options)
    assert len(set(fast["mask"].sum(1).tolist())) > 1  # rows ended at different steps
    assert torch.equal(fast["tokens"], slow["tokens"])
    assert torch.equal(fast["mask"], slow["mask"])
    assert torch.allclose(fast["logprobs"], slow["logprobs"], atol=1e-5)


def test_early_ending_rows_are_masked_and_padded_with_eos():
    stop_after = [0, 2, 5, 99]  # row 0 emits EOS at once, row 3 never does
    model = ForcedEOS(BagOfWordsLM(), LENGTHS, stop_after)
    prompt, prompt_mask = left_padded(LENGTHS, V, pad_id=EOS)
    N = 8
    for sample in (generate, naive_generate):
        out = sample(model, prompt, prompt_mask, N, eos_id=EOS, generator=gen(1))
        assert out["tokens"].shape == (4, N)
        for b, stop in enumerate(stop_after):
            n_real = min(stop + 1, N)  # real tokens: the response through its first EOS, inclusive
            assert out["mask"][b].tolist() == [1] * n_real + [0] * (N - n_real), (sample.__name__, b)
            tokens = out["tokens"][b].tolist()
            assert EOS not in tokens[:min(stop, N)]
            if stop < N:
                assert tokens[stop:] == [EOS] * (N - stop)
            assert (out["logprobs"][b, n_real:] == 0).all()
        forced = response_logprobs(model, prompt, prompt_mask, out["tokens"], out["mask"])
        assert torch.allclose(out["logprobs"], forced, atol=1e-5)
        # every row ended early: the output stops at the longest response (no all-padding columns)
        early = sample(ForcedEOS(BagOfWordsLM(), LENGTHS, [0, 2, 1, 3]), prompt, prompt_mask, N, eos_id=EOS,
                       generator=gen(1))
        assert early["tokens"].shape == (4, 4)
        assert early["mask"].sum(1).tolist() == [1, 3, 2, 4]


def test_early_ending_structure_on_random_samples():
    # without forcing: a small vocabulary makes EOS common; check the invariants on every row
    model = BagOfWordsLM(vocab_size=6, seed=2)
    eos = 5
    prompt, prompt_mask = left_padded([3, 1, 2] * 20, 6, seed=2, pad_id=eos)
    out = generate(model, prompt, prompt_mask, 12, eos_id=eos, generator=gen(2))
    N = out["tokens"].size(1)
    lengths = out["mask"].sum(1)
    ended = 0
    for tokens, mask, logprobs, n in zip(out["tokens"].tolist(), out["mask"].tolist(), out["logprobs"], lengths):
        assert mask == [1] * n + [0] * (N - n)
        if eos in tokens[:n]:
            assert tokens.index(eos) == n - 1  # the first EOS is the last real token
            assert tokens[n:] == [eos] * (N - n)
            ended += n < 12
        else:
            assert n == 12  # a row without EOS runs to max_new_tokens
        assert (logprobs[n:] == 0).all() and (logprobs[:n] < 0).all()
    assert 0 < ended < len(lengths), "the sample should hold both early-ending and long rows"
    assert N == int(lengths.max())


def test_generate_is_deterministic_for_a_seed():
    model = BagOfWordsLM()
    prompt, prompt_mask = left_padded(LENGTHS, V, pad_id=EOS)
    a = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(11))
    b = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(11))
    c = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(12))
    for k in ("tokens", "mask", "logprobs"):
        assert torch.equal(a[k], b[k])
    assert not (a["tokens"].shape == c["tokens"].shape and torch.equal(a["tokens"], c["tokens"]))
