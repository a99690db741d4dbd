"""nanorlhf/model.py: Hugging Face GPT-2 conversion against a reference forward written from the
HF tensors, defaults and errors. The assignment attention_kv_cache (attention, causality, left
padding, KV-cache decoding against a full forward) is tested in tests/assignments/."""
import math

import pytest
import torch

from conftest import TINY, make_gpt
from nanorlhf.model import GPT, GPTConfig, ScalarGPT, from_hf_gpt2, to_hf_gpt2


def full_forward(model, tokens, mask):
    # the reference: one pass over the whole left-padded sequence, position_ids = cumsum(mask) - 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return model(tokens, position_ids=pos, attention_mask=mask)


# ---------------------------------------------------------------- Hugging Face GPT-2 layout

def hf_state_dict(n_layer=2, n_embd=128, vocab_size=29, block_size=16, seed=0):
    """A random GPT-2 checkpoint in the Hugging Face GPT2LMHeadModel layout: Conv1D weights
    are (in, out), each layer carries the causal-mask buffers attn.bias / attn.masked_bias."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    C = n_embd
    sd = {"transformer.wte.weight": r(vocab_size, C), "transformer.wpe.weight": r(block_size, C)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
            p + "attn.bias": torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size),
            p + "attn.masked_bias": torch.tensor(-1e4),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
        })
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + r(C), r(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied in every released GPT-2
    return sd


def hf_reference_forward(sd, idx, n_head):
    """GPT-2 straight from the HF tensors, one sequence idx (T,) -> logits (T, V).
    Conv1D computes x @ W + b with W stored (in, out)."""
    w = lambda k: sd["transformer." + k]
    conv1d = lambda x, k: x @ w(k + ".weight") + w(k + ".bias")

    def layer_norm(x, k):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w(k + ".weight") + w(k + ".bias")

    def gelu(x):  # GPT-2's tanh approximation
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    T = idx.size(0)
    C = w("wte.weight").size(1)
    hd = C // n_head
    h = w("wte.weight")[idx] + w("wpe.weight")[:T]  # (T, C)
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    for i in range(n_layer):
        q, k, v = conv1d(layer_norm(h, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, dim=1)
        heads = []
        for j in range(n_head):
            s = slice(j * hd, (j + 1) * hd)
            att = q[:, s] @ k[:, s].T / math.sqrt(hd)  # (T, T)
            att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
            heads.append(att @ v[:, s])
        h = h + conv1d(torch.cat(heads, 1), f"h.{i}.attn.c_proj")
        h = h + conv1d(gelu(conv1d(layer_norm(h, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return layer_norm(h, "ln_f") @ w("wte.weight").T


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("with_lm_head", [True, False])
def test_from_hf_gpt2_matches_reference_forward(prefix, with_lm_head):
    sd = hf_state_dict()
    idx = torch.randint(0, 29, (12,), generator=torch.Generator().manual_seed(5))
    expected = hf_reference_forward(sd, idx, n_head=2)
    given = dict(sd)
    if not with_lm_head:
        del given["lm_head.weight"]
    if not prefix:
        given = {k.removeprefix("transformer."): v for k, v in given.items()}
    model = from_hf_gpt2(given).eval()
    assert model.config.n_head == 128 // 64  # n_head None -> n_embd // 64
    assert (model.config.n_layer, model.config.block_size, model.config.vocab_size) == (2, 16, 29)
    got = model(idx[None])[0]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_from_hf_gpt2_explicit_n_head():
    sd = hf_state_dict()
    idx = torch.randint(0, 29, (10,), generator=torch.Generator().manual_seed(6))
    model = from_hf_gpt2(sd, n_head=4).eval()
    assert model.config.n_head == 4
    assert torch.allclose(model(idx[None])[0], hf_reference_forward(sd, idx, n_head=4), atol=1e-4)
    # heads matter: the 2-head reference differs, so the comparison above can fail
    assert not torch.allclose(model(idx[None])[0], hf_reference_forward(sd, idx, n_head=2), atol=1e-3)


def test_to_hf_gpt2_inverts_from_hf_gpt2():
    sd = hf_state_dict()
    back = to_hf_gpt2(from_hf_gpt2(sd))
    expected = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k
    # and the other way round: our model -> HF layout -> our model computes the same
    model = make_gpt()
    again = from_hf_gpt2(to_hf_gpt2(model), n_head=model.config.n_head).eval()
    x = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(7))
    assert torch.equal(again(x), model(x))


def test_from_hf_gpt2_rejects_an_incomplete_state_dict():
    sd = hf_state_dict()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match="GPT-2"):
        from_hf_gpt2(sd)


# ---------------------------------------------------------------- defaults and errors

def test_dropout_is_off_by_default():
    assert GPTConfig().dropout == 0.0
    model = GPT(GPTConfig(**TINY)).train()  # training mode: dropout would make two passes differ
    x = torch.randint(0, TINY["vocab_size"], (2, 8))
    assert torch.equal(model(x), model(x))
    dropped = GPT(GPTConfig(**TINY, dropout=0.5)).train()
    assert not torch.equal(dropped(x), dropped(x))  # the check above can fail


def test_scalar_head_starts_at_exactly_zero():
    model = ScalarGPT(GPTConfig(**TINY))
    values = model(torch.randint(0, TINY["vocab_size"], (3, 7)))
    assert values.shape == (3, 7)
    assert torch.equal(values, torch.zeros(3, 7))
    assert model.gpt.transformer.wte.weight.abs().sum() > 0  # the trunk itself is not zero


def test_block_size_overflow_raises_a_clear_error():
    model = make_gpt()
    with pytest.raises(ValueError, match="block_size is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    model(torch.zeros(1, 32, dtype=torch.long))  # exactly block_size is fine
    # left padding does not count: 40 columns, 30 real tokens -> positions 0..29
    mask = torch.cat([torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    full_forward(model, torch.zeros(1, 40, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="raise block_size"):
        model(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 32]]))
