"""nanorlhf/sampler.py (CPU, fp32): generate with nanorlhf's GPT and its KV cache against the
no-cache naive_generate, top-k / top-p sets, errors. The assignment generate (its decode loop:
logprobs, early-ending rows, seeding) is tested in tests/assignments/ with a model without attention."""
import pytest
import torch

from conftest import TINY, left_padded, make_gpt
from nanorlhf.sampler import filter_logits, generate, naive_generate, sample_token

EOS = TINY["vocab_size"] - 1
LENGTHS = [4, 1, 6, 3]  # real prompt tokens per row, left padded to 6


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                     dict(temperature=1.2, top_p=0.7)])
def test_generate_with_gpt_kv_cache_equals_naive_generate(options):
    # docs/design.md detail 10: incremental decoding from the KV cache draws what full forwards draw
    model = make_gpt(vocab_size=8)  # small vocabulary: EOS is common, rows end at different steps
    eos = 7
    prompt, prompt_mask = left_padded(LENGTHS, 8, seed=1, pad_id=eos)
    fast = generate(model, prompt, prompt_mask, 16, eos_id=eos, generator=gen(4), check_every=3, **options)
    slow = naive_generate(model, prompt, prompt_mask, 16, eos_id=eos, generator=gen(4), **options)
    assert len(set(fast["mask"].sum(1).tolist())) > 1  # rows ended at different steps
    assert torch.equal(fast["tokens"], slow["tokens"])
    assert torch.equal(fast["mask"], slow["mask"])
    assert torch.allclose(fast["logprobs"], slow["logprobs"], atol=1e-5)


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


def test_the_most_likely_token_always_stays():
    logits = torch.tensor([[0.5, 3.0, 1.0, 3.0 - 1e-3]])
    greedy = [i for i, v in enumerate(filter_logits(logits, top_p=0.0)[0].tolist()) if v > float("-inf")]
    assert greedy == [1]  # top_p 0 is greedy decoding (it once cut every token)
    assert filter_logits(logits, top_k=1)[0].argmax() == 1
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        filter_logits(logits, top_k=0)


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    tokens, _ = sample_token(logits.expand(20000, 5), temperature=1.5, generator=gen(3))
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert torch.allclose(freq, (logits[0] / 1.5).softmax(-1), atol=0.015)


# ---------------------------------------------------------------- errors

def test_generate_refuses_too_long_and_missing_eos():
    model = make_gpt()  # block_size 32
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)  # width 6
    with pytest.raises(ValueError, match="block_size"):
        generate(model, prompt, prompt_mask, 27, eos_id=EOS)
    generate(model, prompt, prompt_mask, 26, eos_id=EOS, generator=gen(0))  # 6 + 26 = 32 fits
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, prompt, prompt_mask, 4)
