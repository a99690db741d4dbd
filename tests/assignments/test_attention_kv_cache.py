"""Assignment attention_kv_cache (nanorlhf/model.py, CausalSelfAttention.forward): attention against
a per-head loop, causality, left padding, and KV-cache decoding against a full forward (docs/design.md detail 10)."""
import math

import pytest
import torch

from conftest import TINY, left_padded, make_gpt
from nanorlhf.model import attention_bias

ATOL = 1e-5
LENGTHS = [5, 2, 7, 1]  # real prompt tokens per row, left padded to 7


def full_forward(model, tokens, mask):
    # the reference: one pass over the whole left-padded sequence, position_ids = cumsum(mask) - 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return model(tokens, position_ids=pos, attention_mask=mask)


@torch.no_grad()
def test_attention_matches_a_per_head_loop():
    # y_i = sum_j softmax_j(q_i . k_j / sqrt(hd)) v_j per head, over keys j <= i that are not padding
    # (a padded query sees itself only), then the output projection c_proj
    attn = make_gpt().transformer.h[0].attn
    B, T, C, nh = 2, 6, TINY["n_embd"], TINY["n_head"]
    hd = C // nh
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = attn(x, attention_bias(mask, torch.arange(T), x.dtype))  # (B, T, C)
    q, k, v = attn.c_attn(x).split(C, dim=2)
    heads = torch.zeros(B, T, C)
    for b in range(B):
        for h in range(nh):
            s = slice(h * hd, (h + 1) * hd)
            for i in range(T):
                keys = [j for j in range(T) if j == i or (j < i and mask[b, j])]
                weights = torch.tensor([q[b, i, s] @ k[b, j, s] / math.sqrt(hd) for j in keys]).softmax(0)
                heads[b, i, s] = sum(w * v[b, j, s] for w, j in zip(weights, keys))
    expected = attn.c_proj(heads)
    assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("mask_width", ["so_far", "whole_cache"])
def test_kv_cache_decoding_equals_full_forward_on_left_padded_batch(mask_width, static_shapes):
    model = make_gpt()
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"])
    B, P = prompt.shape
    N = 6
    new = torch.randint(0, TINY["vocab_size"], (B, N), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([prompt, new], 1)  # (B, P+N)
    mask = torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.long)], 1)
    expected = full_forward(model, tokens, mask)  # (B, P+N, V)

    cache = model.new_kv_cache(B, P + N, static_shapes=static_shapes)  # attention over filled / all columns
    width = lambda t: t if mask_width == "so_far" else P + N  # the sampler passes all columns, zeros ahead
    cache_mask = torch.zeros(B, P + N, dtype=torch.long)
    cache_mask[:, :P] = prompt_mask
    got = [model(prompt, position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
                 attention_mask=cache_mask[:, :width(P)], kv_cache=cache)]
    n_real = prompt_mask.sum(1, keepdim=True)  # (B, 1) running count of real tokens = next position id
    for t in range(N):
        cache_mask[:, P + t] = 1
        got.append(model(new[:, t:t + 1], position_ids=n_real, attention_mask=cache_mask[:, :width(P + t + 1)],
                         kv_cache=cache))
        n_real = n_real + 1
    got = torch.cat(got, 1)  # (B, P+N, V)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=ATOL), (got[real] - expected[real]).abs().max()
    assert cache.pos == P + N


def test_left_padded_row_equals_the_row_alone():
    model = make_gpt()
    tokens, mask = left_padded(LENGTHS, TINY["vocab_size"])
    batched = full_forward(model, tokens, mask)
    for b, n in enumerate(LENGTHS):
        alone = model(tokens[b:b + 1, -n:])[0]  # (n, V): no padding, default positions 0..n-1
        assert torch.allclose(batched[b, -n:], alone, atol=ATOL), (b, (batched[b, -n:] - alone).abs().max())
    # the check can fail: without position ids the padded rows are shifted and differ
    shifted = model(tokens, attention_mask=mask, position_ids=torch.arange(tokens.size(1)).expand_as(tokens))
    assert not torch.allclose(shifted[0, -LENGTHS[0]:], model(tokens[:1, -LENGTHS[0]:])[0], atol=ATOL)


def test_causal_future_token_does_not_change_earlier_logits():
    model = make_gpt()
    x = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % TINY["vocab_size"]
    lx, ly = model(x), model(y)
    assert torch.equal(lx[:, :6], ly[:, :6])
    assert not torch.allclose(lx[:, 6:], ly[:, 6:], atol=1e-3)  # the change is visible from position 6 on
