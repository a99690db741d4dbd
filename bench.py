"""Benchmarks.

python bench.py sample                      # CPU, fp32: the three model sizes below
python bench.py sample --device cuda --dtype bfloat16 --cuda_graph   # one GPU: the gpu preset, batch 64

`sample` measures generated tokens per second of nanorlhf's sampler (one prefill,
then one token per step from a preallocated KV cache) against
  naive  the nanoGPT-style loop that re-runs the whole sequence every step (no cache)
  hf     Hugging Face transformers generate (its KV cache) on GPT2LMHeadModel holding
         the same weights (converted with to_hf_gpt2)
with the same batch, prompts (half the rows left-padded), sampling settings and dtype.

Fairness: every method decodes exactly --new_tokens steps for every row. The prompts
and weights are random, so all rows emitting <|endoftext|> before the end is
practically impossible (p ~ 1/vocab per row and step); each result is checked to have
--new_tokens columns and the run stops with an error otherwise.
transformers is a benchmark-only dependency: `pip install transformers`; without it
the hf column is skipped.
"""
import argparse
import statistics
import time

import torch

from nanorlhf.config import PRESETS
from nanorlhf.model import GPT, GPTConfig, to_hf_gpt2
from nanorlhf.sampler import generate, make_decode_step, naive_generate

# name -> (vocab_size, n_layer, n_head, n_embd); block_size 512 covers every prompt + response here
MODELS = {
    "4L-128": (4096, 4, 4, 128),  # per-step overhead dominates
    "6L-384": (8192, 6, 6, 384),  # matrix products dominate
    "cpu": tuple(PRESETS["cpu"]["all"][k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")),
    "gpu": tuple(PRESETS["gpu"]["all"][k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_prompts(batch, prompt_len, vocab, eos_id, device, seed=0):
    """Random prompts (B, P), left-padded: the second half of the rows has only P/2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab - 1, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    mask[batch // 2:, :prompt_len // 2] = 0
    tokens = tokens.masked_fill(mask == 0, eos_id)
    return tokens.to(device), mask.to(device)


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_model(model, dtype):
    """GPT2LMHeadModel holding our weights, or None (with a note) without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.set_verbosity_error()
    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=c.vocab_size - 1,
                        eos_token_id=c.vocab_size - 1, pad_token_id=c.vocab_size - 1)
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf_gpt2(model), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    return hf.to(device=model.lm_head.weight.device, dtype=dtype).eval()


def check_width(name, tokens, new_tokens):
    if tokens.size(1) != new_tokens:
        raise SystemExit(f"{name} stopped after {tokens.size(1)} of {new_tokens} tokens: every row ended "
                         f"early (unlucky seed?); rerun with another --seed")


def bench_model(name, args, device, dtype, hf_available):
    vocab, n_layer, n_head, n_embd = MODELS[name]
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=512, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    eos = vocab - 1
    prompt, prompt_mask = make_prompts(args.batch, args.prompt_len, vocab, eos, device, args.seed)
    n = args.batch * args.new_tokens
    row = {"model": name, "params": f"{model.num_params() / 1e6:.1f}M"}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    mode = "cuda_graph" if args.cuda_graph else "compile" if args.compile else "eager"
    step = make_decode_step(model, mode)

    def ours():
        out = generate(model, prompt, prompt_mask, args.new_tokens, temperature=1.0, eos_id=eos, generator=gen,
                       decode_step=step)
        check_width("nanorlhf", out["tokens"], args.new_tokens)

    row["nanorlhf"] = n / timed(ours, device, args.repeats)
    if name in args.naive:
        def naive():
            out = naive_generate(model, prompt, prompt_mask, args.new_tokens, temperature=1.0, eos_id=eos,
                                 generator=gen)
            check_width("naive", out["tokens"], args.new_tokens)
        row["naive"] = n / timed(naive, device, 1)
    if hf_available:
        hf = hf_model(model, dtype)

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=args.new_tokens, pad_token_id=eos, eos_token_id=eos)
            check_width("hf", out[:, prompt.size(1):], args.new_tokens)

        row["hf"] = n / timed(hf_generate, device, args.repeats)
    return row


def print_table(rows):
    cols = ["model", "params", "nanorlhf", "naive", "hf", "x naive", "x hf"]
    for r in rows:
        if "naive" in r:
            r["x naive"] = r["nanorlhf"] / r["naive"]
        if "hf" in r:
            r["x hf"] = r["nanorlhf"] / r["hf"]
    fmt = lambda v: f"{v:,.0f}" if isinstance(v, float) and v > 100 else f"{v:.2f}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) if c in r else "-" for c in cols) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sample"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--models", default="", help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--naive", default="4L-128", help="models that also run the naive sampler (slow)")
    parser.add_argument("--batch", type=int, default=0, help="0 = 32 on CPU, 64 on GPU")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--cuda_graph", action="store_true", help="capture the decode step in a CUDA graph")
    parser.add_argument("--no_hf", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    args.batch = args.batch or (64 if device.type == "cuda" else 32)
    models = args.models.split(",") if args.models else (["gpu"] if device.type == "cuda" else ["4L-128", "6L-384", "cpu"])
    args.naive = args.naive.split(",")
    try:
        import transformers  # noqa: F401
        hf_available = not args.no_hf
    except ImportError:
        hf_available = False
        print("transformers is not installed: skipping the hf column (pip install transformers)")
    print(f"device {device} | dtype {args.dtype} | threads {torch.get_num_threads()} | batch {args.batch} | "
          f"prompt {args.prompt_len} (half the rows {args.prompt_len // 2} real) | new tokens {args.new_tokens} | "
          f"temperature 1, no top-k | tokens/s, median of {args.repeats}")
    rows = [bench_model(name, args, device, dtype, hf_available) for name in models]
    print_table(rows)


if __name__ == "__main__":
    main()
