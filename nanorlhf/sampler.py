"""Batched sampling with a KV cache: the rollout engine of RLHF.

One prefill pass over the left-padded prompts, then one token per step for
every row at once from a preallocated cache. No host-device synchronisation in
the loop except a cheap all-finished check every few steps. Rows that emitted
<|endoftext|> keep emitting it (masked out), so shapes never change.
"""
import torch
import torch.nn.functional as F

from nanorlhf.model import logprobs_from_logits


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / nucleus (top-p) set to -inf. (B, V) -> (B, V)"""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row from softmax(filtered logits / temperature).
    Returns the tokens (B,) and their logprobs under the unfiltered temperature-scaled
    distribution (B,): the quantity PPO's training pass recomputes."""
    logits = logits.float() / temperature  # (B, V)
    probs = filter_logits(logits, top_k, top_p).softmax(-1)
    # exponential race: argmax(p / E), E ~ Exp(1), is a draw from p (same law as multinomial, no sync)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    token = (probs / noise).argmax(-1)  # (B,)
    return token, logprobs_from_logits(logits[:, None], token[:, None])[:, 0]


def _check_lengths(model, prompt_tokens, max_new_tokens):
    P, block = prompt_tokens.size(1), model.config.block_size
    if P + max_new_tokens > block:
        raise ValueError(f"prompt width {P} + max_new_tokens {max_new_tokens} > block_size {block}: "
                         f"shorten prompts (max_prompt_tokens) or max_new_tokens")


def _finish(tokens, logprobs, finished_before, eos_id):
    """Mask through the first EOS; tokens after it become EOS, logprobs 0."""
    tokens = torch.stack(tokens, 1)  # (B, N)
    logprobs = torch.stack(logprobs, 1)
    mask = (~torch.stack(finished_before, 1)).long()  # real until (and including) the first EOS
    tokens = tokens.masked_fill(mask == 0, eos_id)
    n = max(int(mask.sum(1).max()), 1)  # drop trailing columns where every row had already ended
    return {"tokens": tokens[:, :n], "mask": mask[:, :n], "logprobs": (logprobs * mask)[:, :n]}


def generate(model, prompt_tokens, prompt_mask, max_new_tokens, temperature=1.0,
             top_k=None, top_p=None, eos_id=None, generator=None, check_every=8, decode_step=None):
    """Sample continuations of left-padded prompts (B, P).
    Returns {"tokens": (B, N), "mask": (B, N), "logprobs": (B, N)}, N <= max_new_tokens.
    decode_step: optional faster replacement of one cached decode step (compiled or
    CUDA-graph, see make_decode_step); None uses the model directly."""
    if eos_id is None:
        raise ValueError("generate needs eos_id (the tokenizer's eot_token)")
    _check_lengths(model, prompt_tokens, max_new_tokens)
    with torch.inference_mode():
        out = _decode_loop(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                           eos_id, generator, check_every, decode_step)
    return {k: v.clone() for k, v in out.items()}  # normal tensors again: PPO trains on them


def _decode_loop(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                 eos_id, generator, check_every, decode_step):
    B, P = prompt_tokens.shape
    device = prompt_tokens.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    cache = model.new_kv_cache(B, P + max_new_tokens, dtype)
    # the mask over every cache column, filled as we go: (B, P + max_new_tokens)
    attn_mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    attn_mask[:, :P] = prompt_mask
    position = prompt_mask.long().sum(1, keepdim=True)  # (B, 1) next position id of each row
    prompt_pos = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(prompt_tokens, position_ids=prompt_pos, attention_mask=attn_mask, kv_cache=cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, finished_before = [], [], []
    for t in range(max_new_tokens):
        token, logprob = sample_token(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, eos_id)
        tokens.append(token)
        logprobs.append(logprob)
        finished_before.append(finished)
        finished = finished | (token == eos_id)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
            break
        attn_mask[:, P + t] = 1
        if decode_step is None:
            logits = model(token[:, None], position_ids=position, attention_mask=attn_mask, kv_cache=cache)[:, -1]
        else:
            logits = decode_step(token[:, None], position, attn_mask, cache)
        position = position + 1
    return _finish(tokens, logprobs, finished_before, eos_id)


@torch.no_grad()
def naive_generate(model, prompt_tokens, prompt_mask, max_new_tokens, temperature=1.0,
                   top_k=None, top_p=None, eos_id=None, generator=None):
    """The simple path (nanoGPT style): re-run the whole sequence every step, no cache.
    Same draws as generate for the same generator: the reference for tests and bench."""
    _check_lengths(model, prompt_tokens, max_new_tokens)
    B = prompt_tokens.size(0)
    idx, mask = prompt_tokens, prompt_mask.long()
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    tokens, logprobs, finished_before = [], [], []
    for t in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(idx, position_ids=pos, attention_mask=mask)[:, -1]
        token, logprob = sample_token(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, eos_id)
        tokens.append(token)
        logprobs.append(logprob)
        finished_before.append(finished)
        finished = finished | (token == eos_id)
        idx = torch.cat([idx, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(finished.all()):
            break
    return _finish(tokens, logprobs, finished_before, eos_id)


def sample_responses(model, enc, prompts, max_prompt_tokens, max_new_tokens, rt, temperature=1.0,
                     batch_size=64, generator=None, top_k=None, top_p=None):
    """Text in, text out: sample one response per prompt, batch_size prompts at a time.
    Returns {"texts", "ended"} lists and the padded tensors of each batch ("batches")."""
    from nanorlhf.data import encode_prompts, left_pad  # data imports nothing from here
    texts, ended, batches = [], [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        ids = encode_prompts(enc, prompts[i:i + batch_size], max_prompt_tokens)
        prompt, prompt_mask = left_pad(ids, enc.eot_token, rt.device)
        with rt.autocast():
            out = generate(model, prompt, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                           eos_id=enc.eot_token, generator=generator)
        batches.append({"prompt": prompt, "prompt_mask": prompt_mask, **out})
        for tokens, mask in zip(out["tokens"].tolist(), out["mask"].tolist()):
            n = sum(mask)
            done = n > 0 and tokens[n - 1] == enc.eot_token
            texts.append(enc.decode(tokens[:n - 1] if done else tokens[:n]))
            ended.append(done)
    model.train(was_training)
    return {"texts": texts, "ended": ended, "batches": batches}
