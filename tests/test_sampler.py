"""nanorlhf/sampler.py (CPU, fp32): generate against a teacher-forced forward and the
no-cache naive_generate, early-ending rows, top-k / top-p sets, seeding."""
import pytest
import torch

from conftest import TINY, left_padded, make_gpt
from nanorlhf.model import response_logprobs
from nanorlhf.sampler import filter_logits, generate, naive_generate, sample_token

EOS = TINY["vocab_size"] - 1
LENGTHS = [4, 1, 6, 3]  # real prompt tokens per row, left padded to 6


def gen(seed):
    return torch.Generator().manual_seed(seed)


class ForcedEOS(torch.nn.Module):
    """A GPT whose next token is EOS exactly after stop_after[b] response tokens in row b
    and never before: row b's expected mask is known by hand."""

    def __init__(self, gpt, prompt_lengths, stop_after):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.prompt_lengths = torch.tensor(prompt_lengths)[:, None]  # (B, 1)
        self.stop_after = torch.tensor(stop_after)[:, None]  # (B, 1)

    def new_kv_cache(self, *args, **kwargs):
        return self.gpt.new_kv_cache(*args, **kwargs)

    def forward(self, idx, position_ids=None, attention_mask=None, kv_cache=None):
        logits = self.gpt(idx, position_ids, attention_mask, kv_cache).clone()  # (B, T, V)
        # the token predicted after position p is response token number p + 1 - prompt_length
        next_index = position_ids + 1 - self.prompt_lengths  # (B, T)
        logits[..., EOS] = torch.where(next_index == self.stop_after, 100.0, -100.0)
        return logits


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_generate_logprobs_equal_teacher_forced_forward(temperature):
    model = make_gpt()
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
    out = generate(model, prompt, prompt_mask, 10, temperature=temperature, eos_id=EOS, generator=gen(0))
    # DESIGN detail 4: the training pass divides the logits by the same temperature
    forced = response_logprobs(model, prompt, prompt_mask, out["tokens"], out["mask"], temperature)
    assert torch.allclose(out["logprobs"], forced, atol=1e-5), (out["logprobs"] - forced).abs().max()
    # ... and the check can fail: at temperature 1 the logprobs are different
    plain = response_logprobs(model, prompt, prompt_mask, out["tokens"], out["mask"], 1.0)
    assert not torch.allclose(out["logprobs"], plain, atol=1e-3)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                     dict(temperature=1.2, top_p=0.7)])
def test_generate_equals_naive_generate(options):
    model = make_gpt(vocab_size=8)  # small vocabulary: EOS is common, rows end at different steps
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
    model = ForcedEOS(make_gpt(), LENGTHS, stop_after)
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
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
        early = sample(ForcedEOS(make_gpt(), LENGTHS, [0, 2, 1, 3]), prompt, prompt_mask, N, eos_id=EOS,
                       generator=gen(1))
        assert early["tokens"].shape == (4, 4)
        assert early["mask"].sum(1).tolist() == [1, 3, 2, 4]


def test_early_ending_structure_on_random_samples():
    # without forcing: a small vocabulary makes EOS common; check the invariants on every row
    model = make_gpt(vocab_size=6, seed=2)
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


# ---------------------------------------------------------------- top-k / top-p

def top_k_set(probs, k):
    return set(sorted(range(len(probs)), key=lambda i: -probs[i])[:k])


def nucleus_set(probs, p):
    # the smallest set of most likely tokens whose probability reaches p
    keep, total = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        keep.add(i)
        total += probs[i]
        if total >= p:
            break
    return keep


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.6), (None, 0.9), (4, 0.5)])
def test_top_k_top_p_never_sample_outside_their_set(top_k, top_p):
    temperature = 0.9
    logits = torch.randn(3, 12, generator=gen(7)) * 2  # 3 fixed distributions over 12 tokens
    draws = 3000
    tokens, logprobs = sample_token(logits.repeat_interleave(draws, 0), temperature, top_k, top_p, gen(8))
    tokens = tokens.view(3, draws)
    scaled = logits / temperature
    for row in range(3):
        allowed = set(range(12))
        if top_k is not None:
            allowed &= top_k_set(scaled[row].tolist(), top_k)
        if top_p is not None:  # the nucleus of the top-k-filtered, renormalised distribution
            masked = torch.full_like(scaled[row], float("-inf"))
            masked[list(allowed)] = scaled[row, list(allowed)]
            allowed = nucleus_set(masked.softmax(-1).tolist(), top_p)
        seen = set(tokens[row].tolist())
        assert seen <= allowed, (row, seen - allowed)
        kept = filter_logits(scaled[row:row + 1], top_k, top_p)[0]
        assert {i for i in range(12) if kept[i] > float("-inf")} == allowed
        # frequencies follow the renormalised probabilities of the set
        probs = kept.softmax(-1)
        freq = torch.bincount(tokens[row], minlength=12).float() / draws
        assert torch.allclose(freq, probs, atol=0.04), (freq, probs)
    # the returned logprob is under the unfiltered temperature-scaled distribution (what PPO recomputes)
    expected = torch.log_softmax(scaled.repeat_interleave(draws, 0), -1).gather(1, tokens.view(-1, 1))[:, 0]
    assert torch.allclose(logprobs, expected, atol=1e-6)


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    tokens, _ = sample_token(logits.expand(20000, 5), temperature=1.5, generator=gen(3))
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert torch.allclose(freq, (logits[0] / 1.5).softmax(-1), atol=0.015)


# ---------------------------------------------------------------- seeds and errors

def test_generate_is_deterministic_for_a_seed():
    model = make_gpt()
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
    a = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(11))
    b = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(11))
    c = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(12))
    for k in ("tokens", "mask", "logprobs"):
        assert torch.equal(a[k], b[k])
    assert not (a["tokens"].shape == c["tokens"].shape and torch.equal(a["tokens"], c["tokens"]))


def test_generate_refuses_too_long_and_missing_eos():
    model = make_gpt()  # block_size 32
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)  # width 6
    with pytest.raises(ValueError, match="block_size"):
        generate(model, prompt, prompt_mask, 27, eos_id=EOS)
    generate(model, prompt, prompt_mask, 26, eos_id=EOS, generator=gen(0))  # 6 + 26 = 32 fits
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, prompt, prompt_mask, 4)
