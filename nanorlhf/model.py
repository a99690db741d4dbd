"""GPT-2 (Radford et al. 2019) in one file: pre-LayerNorm blocks, GELU MLP,
learned positions, tied embeddings, an explicit KV cache for incremental
decoding, and a scalar head for the reward and value models.

Left-padded batches work because every forward takes
  position_ids   (B, T)       cumsum(mask) - 1, so real tokens start at position 0
  attention_mask (B, T_keys)  1 on real tokens, 0 on padding (cached keys + new ones)
"""
import math
import os
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 2048
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class KVCache:
    """Keys and values, one (B, nh, max_len, hd) tensor per layer, preallocated once for
    the whole rollout: decoding writes one column per step instead of growing tensors
    with cat. Column j of the cache holds position j of the left-padded sequence.
    static_shapes False: attention reads the filled columns only (fewest bytes, eager mode).
    static_shapes True: attention reads all max_len columns (unfilled ones masked), so every
    step has the same shapes, as torch.compile and CUDA graphs want."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device, dtype, static_shapes=False):
        # one tensor per layer: torch.compile then updates each in place instead of copying the whole stack
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.static_shapes = static_shapes
        self.pos = 0  # columns filled so far (python-side bookkeeping)
        # the same count as a device tensor, advanced in place, so that a captured CUDA graph replays correctly
        self.next_column = torch.zeros(1, dtype=torch.long, device=device)

    def reset(self):
        """Empty again, keeping the buffers (and their addresses, which a CUDA graph replays)."""
        self.pos = 0
        self.next_column.zero_()

    def key_width(self, T):
        """How many cache columns the attention reads once T new tokens are written."""
        return self.max_len if self.static_shapes else self.pos + T

    def update(self, layer, k, v, columns):
        # k, v: (B, nh, T, hd) for the new columns (T,) -> the cached keys/values (B, nh, key_width, hd)
        T = k.size(2)
        k_cache, v_cache = self.k[layer], self.v[layer]
        if self.static_shapes:  # columns from the device counter: a replayed CUDA graph writes the right ones
            k_cache.index_copy_(2, columns, k.to(k_cache.dtype))
            v_cache.index_copy_(2, columns, v.to(v_cache.dtype))
        else:  # the same columns from the python count: a plain strided copy, several times faster on CPU
            k_cache[:, :, self.pos:self.pos + T] = k
            v_cache[:, :, self.pos:self.pos + T] = v
        width = self.key_width(T)
        return k_cache[:, :, :width], v_cache[:, :, :width]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_bias, kv_cache=None, layer=0, columns=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hd)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # with a cache: K, V = the cached columns and the new ones (kv_cache.update); otherwise K, V = k, v
        # y = softmax(q K^T / sqrt(hd) + attn_bias) V          (Vaswani et al. 2017, Eq. 1), (B, nh, T, hd)
        # BEGIN ASSIGNMENT attention_kv_cache
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, columns)  # (B, nh, key_width, hd): the cached columns to attend over
        # softmax(q k^T / sqrt(hd) + bias) v; attn_bias is 0 where allowed, -inf where masked
        # (None: plain causal attention, which lets SDPA pick its flash kernel)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=attn_bias is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        # END ASSIGNMENT
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_bias, kv_cache=None, layer=0, columns=None):
        x = x + self.attn(self.ln_1(x), attn_bias, kv_cache, layer, columns)
        return x + self.mlp(self.ln_2(x))


def attention_bias(attention_mask, query_columns, dtype):
    """Additive attention bias (B, 1, T, T_keys): query at column q may see key
    column k when k <= q (causal) and key k is not padding; 0 = allowed, -inf = masked."""
    T_keys = attention_mask.size(1)
    k_cols = torch.arange(T_keys, device=attention_mask.device)
    causal = k_cols[None, :] <= query_columns[:, None]  # (T, T_keys)
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (B, T, T_keys)
    # a query at a padded position may see no key at all; let it see itself so softmax stays finite
    allowed = allowed | (k_cols[None, :] == query_columns[:, None])[None]
    bias = torch.zeros(allowed.shape, device=attention_mask.device, dtype=dtype)
    return bias.masked_fill(~allowed, float("-inf"))[:, None]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.grad_checkpoint = False  # --grad_checkpoint: recompute each block in the backward pass
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def new_kv_cache(self, batch_size, max_len, dtype=None, static_shapes=False):
        c = self.config
        dtype = dtype or self.transformer.wte.weight.dtype
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head,
                       self.transformer.wte.weight.device, dtype, static_shapes)

    def hidden_states(self, idx, position_ids=None, attention_mask=None, kv_cache=None):
        """Final-LayerNorm hidden states (B, T, C). idx (B, T) are the new tokens;
        with a kv_cache they fill the next T cache columns and attention_mask covers
        the keys cached so far plus idx (or all max_len cache columns)."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        causal_only = attention_mask is None and kv_cache is None  # no padding: the fused causal kernel
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
        if position_ids is None:
            position_ids = (attention_mask[:, :past + T].cumsum(1) - 1).clamp(min=0)[:, -T:]
        # the sampler checks up front; torch.compile skips the check (reading the max would split its graph)
        if kv_cache is None and not torch.compiler.is_compiling() and int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"sequence reaches position {int(position_ids.max())} but block_size is "
                             f"{self.config.block_size}: shorten prompt + response or raise block_size")
        columns = torch.arange(T, device=idx.device)  # (T,) cache columns of the new tokens
        if kv_cache is not None:
            columns = columns + kv_cache.next_column
            width = kv_cache.key_width(T)  # the mask covers exactly the key columns the attention reads
            if attention_mask.size(1) < width:  # unfilled columns are not keys
                attention_mask = F.pad(attention_mask, (0, width - attention_mask.size(1)))
            attention_mask = attention_mask[:, :width]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        attn_bias = None if causal_only else attention_bias(attention_mask, columns, x.dtype)
        for layer, block in enumerate(self.transformer.h):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # gradient checkpointing (Chen et al. 2016): keep only each block's input and recompute
                # its activations in the backward pass: ~1/3 more compute for a fraction of the memory
                x = checkpoint(block, x, attn_bias, use_reentrant=False)
            else:
                x = block(x, attn_bias, kv_cache, layer, columns)
        if kv_cache is not None:
            kv_cache.pos += T
            kv_cache.next_column += T
        return self.transformer.ln_f(x)

    def forward(self, idx, position_ids=None, attention_mask=None, kv_cache=None):
        h = self.hidden_states(idx, position_ids, attention_mask, kv_cache)
        return self.lm_head(h)  # (B, T, V)


class ScalarGPT(nn.Module):
    """The GPT trunk with a scalar head instead of the LM head: the reward model
    reads it at the last real token, the value model at every response token."""

    def __init__(self, config):
        super().__init__()
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # starts at 0: a value model predicts nothing yet
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, position_ids=None, attention_mask=None):
        return self.head(self.gpt.hidden_states(idx, position_ids, attention_mask)).squeeze(-1)  # (B, T)


def join_prompt_response(prompt, prompt_mask, response, response_mask):
    """Left-padded prompt (B, P) + right-padded response (B, N) -> one sequence
    (B, P+N) with its attention mask and position ids (cumsum(mask) - 1)."""
    idx = torch.cat([prompt, response], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return idx, mask, position_ids


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log p(tokens) under softmax(logits / temperature), in fp32. (B, T, V), (B, T) -> (B, T)"""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def lm_loss(logits, targets, loss_mask):
    """Mean -log p(target) over the targets that count (loss_mask 1), in fp32: the SFT loss.
    (B, T, V), (B, T), (B, T) -> scalar"""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return (nll * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def response_logits(model, prompt, prompt_mask, response, response_mask):
    """Teacher-forced logits that predict each response token: (B, N, V).
    The token at response position t is predicted by the logits one step earlier."""
    idx, mask, pos = join_prompt_response(prompt, prompt_mask, response, response_mask)
    logits = model(idx, position_ids=pos, attention_mask=mask)  # (B, P+N, V)
    P = prompt.size(1)
    return logits[:, P - 1:-1]


def response_values(model, prompt, prompt_mask, response, response_mask):
    """A ScalarGPT's value V(s_t) for each response token t, read at the position that predicts it:
    (B, N), in fp32 (PPO's value model)."""
    idx, mask, pos = join_prompt_response(prompt, prompt_mask, response, response_mask)
    return model(idx, position_ids=pos, attention_mask=mask)[:, prompt.size(1) - 1:-1].float()


def response_logprobs(model, prompt, prompt_mask, response, response_mask, temperature=1.0):
    """log p(response_t | prompt, response_<t) at temperature, (B, N); 0 on padding."""
    logits = response_logits(model, prompt, prompt_mask, response, response_mask)
    return logprobs_from_logits(logits, response, temperature) * response_mask


# ---------------------------------------------------------------------------
# Hugging Face GPT-2 weights. HF uses Conv1D layers whose weights are stored
# (in, out), the transpose of nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_hf_gpt2(state_dict, n_head=None):
    """Build a GPT from the tensors of a Hugging Face GPT-2 checkpoint (keys with
    or without the "transformer." prefix). n_head None means n_embd // 64."""
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    vocab_size, n_embd = sd["wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    config = GPTConfig(vocab_size=vocab_size, block_size=sd["wpe.weight"].shape[0], n_layer=n_layer,
                       n_head=n_head or n_embd // 64, n_embd=n_embd, bias=True)
    model = GPT(config)
    ours = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        ours["transformer." + k] = v.t() if k.endswith(_CONV1D) else v
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    missing = set(model.state_dict()) - set(ours)
    if missing:
        raise ValueError(f"GPT-2 state dict lacks {sorted(missing)[:5]}: is it a GPT-2 checkpoint?")
    model.load_state_dict(ours)
    return model


def to_hf_gpt2(model):
    """The inverse of from_hf_gpt2: our weights in the Hugging Face GPT2LMHeadModel layout."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            sd[k] = v
            continue
        k = k.removeprefix("transformer.")
        sd["transformer." + k] = v.t() if k.endswith(_CONV1D) else v
    return sd


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_pretrained_gpt2(name="gpt2", cache_dir=None):
    """Download GPT-2 weights from the Hugging Face hub (needs internet once) and convert them.
    The .bin file is a plain dict of tensors, so it loads with weights_only=True. HF_ENDPOINT, as in
    Hugging Face's own tools, points at a mirror (the tests serve fake weights from a loopback server)."""
    if name not in GPT2_NAMES:
        raise ValueError(f"unknown GPT-2 size {name!r}: {' | '.join(GPT2_NAMES)}")
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "nanorlhf")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{name}-pytorch_model.bin")
    if not os.path.exists(path):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        url = f"{endpoint}/{name}/resolve/main/pytorch_model.bin"
        print(f"downloading {url} -> {path}")
        try:
            urllib.request.urlretrieve(url, path + ".part")
        except OSError as e:
            raise RuntimeError(f"could not download {name} weights from {url} ({e}): the weights need "
                               f"internet once, or put the file at {path}") from e
        os.replace(path + ".part", path)
    return from_hf_gpt2(torch.load(path, map_location="cpu", weights_only=True))
