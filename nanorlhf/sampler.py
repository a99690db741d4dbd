"""Batched sampling with a KV cache: the rollout engine of RLHF.

One prefill pass over the left-padded prompts, then one token per step for
every row at once from a cache preallocated for the whole rollout. No
host-device synchronisation in the loop except a cheap all-finished check every
few steps. Rows that emitted <|endoftext|> keep emitting it (masked out), so
shapes never change. Logprobs of the drawn tokens come from the same pass.

On a GPU the decode step can be compiled or captured in a CUDA graph
(make_decode_step); bench.py measures all of it against a no-cache loop and
Hugging Face generate.
"""
import contextlib

import torch
import torch.nn.functional as F

from nanorlhf.data import encode_prompts, left_pad


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / nucleus (top-p) set to -inf. (B, V) -> (B, V)
    The most likely token always stays: top_p 0 (or top_k 1) is greedy decoding."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no cut), got {top_k}")
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row from softmax(filtered logits / temperature).
    Returns the tokens (B,) and their logprobs under the unfiltered temperature-scaled
    distribution (B,): the quantity PPO's training pass recomputes."""
    logits = logits.float()  # (B, V)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = F.log_softmax(logits, dim=-1)  # (B, V)
    filtered = filter_logits(logits, top_k, top_p)
    probs = logprobs.exp() if filtered is logits else filtered.softmax(-1)  # (B, V)
    token = _inverse_cdf_draw(probs, generator)
    if filtered is not logits:  # a cut token has probability 0; a GPU's parallel cumsum could still round onto one
        token = torch.where(probs.gather(-1, token[:, None])[:, 0] > 0, token, probs.max(-1).indices)
    return token, logprobs.gather(-1, token[:, None])[:, 0]


def _inverse_cdf_draw(probs, generator=None):
    """The first token whose cumulative probability reaches u * total, u ~ U(0, 1]: one random
    number per row (not one per vocabulary entry, as Gumbel-max needs) and no host sync.
    u > 0, so a leading token of probability 0 is never reached; u <= 1, so neither is a trailing one."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = 1.0 - torch.rand(probs.size(0), 1, device=probs.device, generator=generator)  # (B, 1) in (0, 1]
    # clamped: with nan in probs searchsorted returns V, one past the vocabulary (an index error on CPU, a
    # device assert on CUDA); generate then stops with NonFiniteLogitsError, which says why
    return torch.searchsorted(cdf, u * cdf[:, -1:])[:, 0].clamp_(max=probs.size(-1) - 1)  # (B,)


class NonFiniteLogitsError(RuntimeError):
    """The model's logits held nan or inf: its weights diverged (or a checkpoint holds such weights)."""

    def __init__(self):
        super().__init__("the model produced non-finite logits (nan/inf) while sampling: its weights diverged (or "
                         "a tiny --temperature overflowed them). Use the last good checkpoint, or train again with "
                         "a lower --lr")


def _check_lengths(model, prompt_tokens, max_new_tokens):
    P, block = prompt_tokens.size(1), model.config.block_size
    if P + max_new_tokens > block:
        raise ValueError(f"prompt width {P} + max_new_tokens {max_new_tokens} > block_size {block}: "
                         f"shorten prompts (max_prompt_tokens) or max_new_tokens")


def _finish(tokens, logprobs, finished_before, eos_id):
    """Mask through the first EOS; tokens after it become EOS, logprobs 0. Non-finite logits (nan, +inf,
    a row of -inf) make the drawn token's logprob nan: checked here once, in the same host read as the
    output width, instead of at every step."""
    tokens = torch.stack(tokens, 1)  # (B, N)
    logprobs = torch.stack(logprobs, 1)
    bad = ~torch.isfinite(logprobs).all()
    mask = (~torch.stack(finished_before, 1)).long()  # real until (and including) the first EOS
    tokens = tokens.masked_fill(mask == 0, eos_id)
    n = int(torch.where(bad, -1, mask.sum(1).max()))  # -1: the logits went non-finite
    if n < 0:
        raise NonFiniteLogitsError()
    n = max(n, 1)  # drop trailing columns where every row had already ended
    return {"tokens": tokens[:, :n], "mask": mask[:, :n], "logprobs": (logprobs * mask)[:, :n]}


def generate(model, prompt_tokens, prompt_mask, max_new_tokens, temperature=1.0,
             top_k=None, top_p=None, eos_id=None, generator=None, check_every=8, decode_step=None):
    """Sample continuations of left-padded prompts (B, P).
    Returns {"tokens": (B, N), "mask": (B, N), "logprobs": (B, N)}, N <= max_new_tokens.
    decode_step: make_decode_step(model, "compile" | "cuda_graph") for a faster decode step
    on a GPU; None runs the model op by op."""
    if eos_id is None:
        raise ValueError("generate needs eos_id (the tokenizer's eot_token)")
    _check_lengths(model, prompt_tokens, max_new_tokens)
    with torch.inference_mode():
        out = _decode_loop(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                           eos_id, generator, check_every, decode_step or EagerDecodeStep(model))
    return {k: v.clone() for k, v in out.items()}  # normal tensors again: PPO trains on them


def _decode_loop(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                 eos_id, generator, check_every, decode_step):
    B, P = prompt_tokens.shape
    L = P + max_new_tokens
    device = prompt_tokens.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    cache = decode_step.new_kv_cache(B, L, dtype)
    # the mask over every cache column, filled as we go: (B, L)
    attn_mask = torch.zeros(B, L, dtype=torch.long, device=device)
    attn_mask[:, :P] = prompt_mask
    position = prompt_mask.long().sum(1, keepdim=True)  # (B, 1) next position id of each row
    prompt_pos = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(prompt_tokens, position_ids=prompt_pos, attention_mask=attn_mask, kv_cache=cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, finished_before = [], [], []
    for t in range(max_new_tokens):
        # one step of autoregressive sampling with a KV cache: draw y_t ~ pi(. | x, y_<t) (sample_token),
        # rows that ended keep emitting EOS, record it, then feed y_t back at the next position
        # BEGIN ASSIGNMENT generate
        token, logprob = sample_token(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, eos_id)
        tokens.append(token)
        logprobs.append(logprob)
        finished_before.append(finished)
        finished = finished | (token == eos_id)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
            break  # the only host sync: every check_every steps, stop once every row has ended
        attn_mask[:, P + t] = 1
        logits = decode_step(token[:, None], position, attn_mask, cache)  # (B, V)
        position = position + 1
        # END ASSIGNMENT
    return _finish(tokens, logprobs, finished_before, eos_id)


# ---------------------------------------------------------------------------
# The decode step: token (B, 1), position (B, 1), attn_mask (B, L), cache -> logits (B, V)
# of the next token, its key and value written into the cache. Three ways to run it.

def make_decode_step(model, mode="eager"):
    """mode "eager" (op by op), "compile" (torch.compile; also runs on CPU) or "cuda_graph"
    (captured once per batch size and cache length, then replayed; eager without CUDA).
    Make it once and pass it to every generate call: it keeps its compiled code or graphs."""
    if mode not in ("eager", "compile", "cuda_graph"):
        raise ValueError(f"unknown decode step mode {mode!r}: eager | compile | cuda_graph")
    if mode == "cuda_graph" and next(model.parameters()).device.type != "cuda":
        print("decode step: CUDA graphs need the model on a CUDA device; running eager")
        mode = "eager"
    return {"eager": EagerDecodeStep, "compile": CompiledDecodeStep, "cuda_graph": CUDAGraphDecodeStep}[mode](model)


class EagerDecodeStep:
    """The model called op by op. Its cache attends over the filled columns only."""

    def __init__(self, model):
        self.model = model

    def new_kv_cache(self, batch_size, max_len, dtype):
        return self.model.new_kv_cache(batch_size, max_len, dtype)

    def __call__(self, token, position, attn_mask, cache):
        return self.model(token, position_ids=position, attention_mask=attn_mask, kv_cache=cache)[:, -1]


class CompiledDecodeStep(EagerDecodeStep):
    """torch.compile of the step over a static-shape cache: every step has the same shapes, so it
    compiles once per batch size and cache length (the first call takes seconds to a minute).
    Where compiling fails (no C++ compiler for CPU code, no Triton for GPU code) it runs eager."""

    def __init__(self, model):
        super().__init__(model)
        self.compiled = torch.compile(super().__call__, dynamic=False)
        self.ran = False

    def new_kv_cache(self, batch_size, max_len, dtype):
        return self.model.new_kv_cache(batch_size, max_len, dtype, static_shapes=True)

    def __call__(self, token, position, attn_mask, cache):
        # a static-shape step never reads the python count cache.pos; holding it at 0 during the
        # call keeps torch.compile from specialising on its value (and recompiling every step)
        pos, cache.pos = cache.pos, 0
        try:
            logits = self.compiled(token, position, attn_mask, cache)
        except Exception as e:  # compiling fails before the step runs: the cache is as it was
            if self.ran:
                raise
            print(f"decode step: torch.compile failed ({type(e).__name__}); running eager")
            self.compiled = super().__call__
            logits = self.compiled(token, position, attn_mask, cache)
        self.ran = True
        cache.pos = pos + 1
        return logits


class CUDAGraphDecodeStep(EagerDecodeStep):
    """The step captured in a CUDA graph once per (batch size, cache length, dtype) and replayed:
    one launch per step instead of one per op. A replay reads and writes fixed addresses, so this
    object owns the caches and input buffers, and each call copies its inputs in. The graph reads
    the weights in place: optimizer steps are seen; a model moved or rebuilt needs a new step."""

    def __init__(self, model):
        super().__init__(model)
        self.graphs = {}  # (B, L, dtype) -> {"cache", "inputs", "graph", "logits"}
        self.pool = torch.cuda.graph_pool_handle()  # the graphs share one memory pool

    def new_kv_cache(self, batch_size, max_len, dtype):
        key = (batch_size, max_len, dtype or next(self.model.parameters()).dtype)
        if key not in self.graphs:
            self.graphs[key] = {"cache": self.model.new_kv_cache(batch_size, max_len, key[2], static_shapes=True)}
        cache = self.graphs[key]["cache"]
        cache.reset()
        return cache

    def __call__(self, token, position, attn_mask, cache):
        entry = self.graphs[(token.size(0), cache.max_len, cache.k[0].dtype)]
        if "graph" not in entry:
            self._capture(entry, token, position, attn_mask)
        for buffer, value in zip(entry["inputs"], (token, position, attn_mask)):
            buffer.copy_(value)
        entry["graph"].replay()  # writes the new key/value column and advances cache.next_column
        cache.pos += 1
        return entry["logits"]

    def _capture(self, entry, token, position, attn_mask):
        cache = entry["cache"]
        inputs = entry["inputs"] = (token.clone(), position.clone(), attn_mask.clone())
        pos, column = cache.pos, cache.next_column.clone()
        step = lambda: EagerDecodeStep.__call__(self, *inputs, cache)
        with _autocast_without_cache():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture: lazy initialisation, cuBLAS workspaces
                for _ in range(2):
                    step()
                    cache.next_column.copy_(column)
            torch.cuda.current_stream().wait_stream(side)
            entry["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(entry["graph"], pool=self.pool):  # records the kernels, runs none
                entry["logits"] = step()
        cache.pos = pos  # the python count moved during warm-up and capture; the device count is back


def _autocast_without_cache():
    """Autocast as it is now, minus its cache of cast weights: a captured graph must redo the
    casts on replay, not point at cached copies that are freed when the autocast block ends."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


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
