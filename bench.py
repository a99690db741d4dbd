"""Benchmarks.

python bench.py sample                  # CPU, fp32: the 4L-128, 6L-384 and cpu-preset models
python bench.py sample --compile        # ... plus nanorlhf with a torch.compile'd decode step
python bench.py sample --device cuda --dtype bfloat16 --cuda_graph   # one GPU: the gpu preset, batch 64
python bench.py train                   # SFT training tokens/s and achieved FLOP/s (MFU on a known GPU)
python bench.py train --device cuda --dtype bfloat16 --compile        # the gpu preset, the MFU figure
python bench.py ppo                     # one PPO iteration split into rollout / scoring / ref+value / learning
python bench.py pg                      # PPO vs RLOO vs GRPO: one iteration each, same sampled responses; memory

`train` and `ppo` (nanorlhf/benchmark.py) use random weights at a preset's model size
(--preset; default gpu on CUDA, cpu otherwise). On CPU `train` times fp32 and bf16
autocast side by side: nanorlhf trains in fp32 on CPU because bf16 is not faster there.

`sample` measures generated tokens per second (batch x new tokens / wall time of the
whole call, prefill included) of nanorlhf's sampler against
  naive  the nanoGPT-style loop that re-runs the whole sequence every step, no cache
         (nanorlhf.sampler.naive_generate; slow, so only on the models in --naive)
  hf     Hugging Face transformers `generate` with its KV cache, on a GPT2LMHeadModel
         holding the same weights (converted with to_hf_gpt2; the logits are checked)
with the same batch, prompts (random tokens, half the rows left-padded to half
length), sampling settings (temperature 1, no top-k / top-p) and dtype.

Fairness: every method must decode exactly --new_tokens tokens for every row, and
each result is checked to have that many columns. Both stop only when every row has
emitted <|endoftext|> (here the last vocabulary id); with random weights a row draws
it with probability ~1/vocab per step, so all rows ending early does not happen in
practice (the run stops with an error if it ever does).
transformers is a benchmark-only dependency: `pip install transformers`; without it
the hf column is skipped.
"""
import argparse
import functools
import os
import statistics
import time

import torch

from nanorlhf.config import COMPILE_MODES, PRESETS
from nanorlhf.model import GPT, GPTConfig, to_hf_gpt2
from nanorlhf.runtime import DTYPES
from nanorlhf.sampler import generate, make_decode_step, naive_generate

# name -> (vocab_size, n_layer, n_head, n_embd)
MODELS = {
    "4L-128": (4096, 4, 4, 128),  # per-step overhead dominates
    "6L-384": (8192, 6, 6, 384),  # the matrix products dominate
    **{name: tuple(PRESETS[name]["all"][k] for k in ("vocab_size", "n_layer", "n_head", "n_embd"))
       for name in ("tiny", "cpu", "gpu")},
}


def make_prompts(batch, prompt_len, vocab_size, eos_id, device, seed):
    """Random prompts (B, P), left-padded: the second half of the rows has P/2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size - 1, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    mask[batch // 2:, :prompt_len // 2] = 0
    return tokens.masked_fill(mask == 0, eos_id).to(device), mask.to(device)


def seconds(methods, device, repeats, warmup=True):
    """Median wall time of each method over `repeats` rounds, after one warm-up call each. The
    methods take turns within a round, so a busy spell of a shared machine slows all of them."""
    for fn in methods.values() if warmup else ():
        fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def check_width(name, tokens, new_tokens):
    if tokens.size(1) != new_tokens:
        raise SystemExit(f"{name} stopped after {tokens.size(1)} of {new_tokens} tokens (every row drew "
                         f"<|endoftext|>): rerun with another --seed")


def hf_gpt2(model, dtype):
    """GPT2LMHeadModel with our weights, or None without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.set_verbosity_error()
    c, eos = model.config, model.config.vocab_size - 1
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=eos, eos_token_id=eos,
                           pad_token_id=eos)
    hf = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf.load_state_dict(to_hf_gpt2(model), strict=False)
    if unexpected or any(not k.endswith(".attn.bias") for k in missing):
        raise RuntimeError(f"to_hf_gpt2 does not fit this transformers version: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf.to(device=model.lm_head.weight.device, dtype=dtype).eval()


def bandwidth_fraction(model, batch, prompt_len, new_tokens, seconds_taken):
    """Share of the GPU's memory-bandwidth limit reached: the bytes a rollout must read at least
    (all weights once per step, plus the filled KV cache each step) / peak bandwidth / time."""
    props = torch.cuda.get_device_properties(model.lm_head.weight.device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        peak = 2 * clock_khz * 1e3 * bus_bits / 8  # bytes/s: double data rate x bus width
    else:  # older torch: the datasheet figures of a few cards
        sheet = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12}
        peak = next((bw for name, bw in sheet.items() if name in props.name), None)
        if peak is None:
            return None
    c, size = model.config, model.lm_head.weight.element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    kv_columns = sum(prompt_len + t for t in range(new_tokens))  # columns read, summed over the steps
    kv = 2 * c.n_layer * batch * c.n_embd * size * kv_columns
    return (new_tokens * weights + kv) / peak / seconds_taken, peak


def bench_model(name, args, device, dtype, modes):
    """One table row: tokens/s of every method on one model size."""
    vocab_size, n_layer, n_head, n_embd = MODELS[name]
    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=args.prompt_len + args.new_tokens, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd)
    model = GPT(config).to(device=device, dtype=dtype).eval()
    eos, B, N = vocab_size - 1, args.batch, args.new_tokens
    prompt, prompt_mask = make_prompts(B, args.prompt_len, vocab_size, eos, device, args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    row = {"model": name, "params": f"{model.num_params() / 1e6:.1f}M"}

    def ours(step, n=N):
        out = generate(model, prompt, prompt_mask, n, eos_id=eos, generator=gen, decode_step=step)
        check_width("nanorlhf", out["tokens"], n)

    methods = {mode: functools.partial(ours, make_decode_step(model, mode)) for mode in modes}
    hf = None if args.no_hf else hf_gpt2(model, dtype)
    if hf is not None:
        row["hf logit diff"] = hf_logit_difference(hf, model, prompt, prompt_mask)

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=N, pad_token_id=eos, eos_token_id=eos)
            check_width("hf", out[:, prompt.size(1):], N)
        methods["hf"] = hf_generate
    row.update({m: B * N / t for m, t in seconds(methods, device, args.repeats).items()})

    if name in args.naive.split(","):
        def naive(n=N):
            out = naive_generate(model, prompt, prompt_mask, n, eos_id=eos, generator=gen)
            check_width("naive", out["tokens"], n)
        naive(2)  # a short warm-up, then one run: long enough to time
        row["naive"] = B * N / seconds({"naive": naive}, device, 1, warmup=False)["naive"]

    if device.type == "cuda":
        best = max(modes, key=lambda m: row[m])
        fraction = bandwidth_fraction(model, B, args.prompt_len, N, B * N / row[best])
        if fraction is not None:
            row["bw limit"] = f"{100 * fraction[0]:.0f}% of {fraction[1] / 1e12:.2f} TB/s ({best})"
    return row


def hf_logit_difference(hf, model, prompt, prompt_mask):
    """Largest |logit difference| between the HF model and ours on the real prompt tokens."""
    pos = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    real = prompt_mask.bool()
    with torch.inference_mode():
        theirs = hf(prompt, attention_mask=prompt_mask, position_ids=pos).logits[real]
        ours = model(prompt, position_ids=pos, attention_mask=prompt_mask)[real]
    return float((theirs.float() - ours.float()).abs().max())


def print_table(rows, modes):
    cols = ["model", "params", "naive", "hf"]
    for m in modes:
        cols += [m, f"{m}/naive", f"{m}/hf"]
    cols += [c for c in ("bw limit",) if any(c in r for r in rows)]
    for r in rows:
        for m in modes:
            for other in ("naive", "hf"):
                if other in r:
                    r[f"{m}/{other}"] = f"{r[m] / r[other]:.1f}x" if other == "naive" else f"{r[m] / r[other]:.2f}x"
    show = lambda v: f"{v:,.0f}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(show(r[c]) if c in r else "-" for c in cols) + " |")
    for r in rows:
        if "hf logit diff" in r:
            print(f"{r['model']}: same weights in hf (max |logit difference| {r['hf logit diff']:.1e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sample", "train", "ppo", "pg"], help="what to measure")
    parser.add_argument("--preset", default="", help="train/ppo: the model size (default gpu on CUDA, else cpu)")
    parser.add_argument("--steps", type=int, default=8, help="train: timed optimizer steps")
    parser.add_argument("--algos", default="ppo,rloo,grpo", help="pg: the methods to time, each in a fresh process")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights, activations, cache")
    parser.add_argument("--models", default="", help=f"comma-separated, of {', '.join(MODELS)}; "
                                                     f"default 4L-128,6L-384,cpu on CPU, gpu on CUDA")
    parser.add_argument("--naive", default="4L-128,gpu", help="models that also run the (slow) naive sampler")
    parser.add_argument("--batch", type=int, default=0,
                        help="rows per batch; 0 = sample: 32 on CPU, 64 on CUDA; train: the preset's SFT batch")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt width (half the rows left-padded)")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median), after a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd decode step")
    parser.add_argument("--cuda_graph", action="store_true", help="also time a CUDA-graph decode step")
    parser.add_argument("--no_hf", action="store_true", help="skip Hugging Face generate")
    parser.add_argument("--loss_in_compile", action="store_true",
                        help="train --compile: compile the cross-entropy together with the model")
    parser.add_argument("--attention", default="", choices=["", "flash", "efficient", "cudnn"],
                        help="train: force this SDPA attention kernel (default: SDPA chooses)")
    parser.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                        help="train --compile: torch.compile's mode (max-autotune-no-cudagraphs: minutes to compile)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="train: dropout while training (default: the preset's SFT dropout, as train_sft.py)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.what == "pg":
        return bench_pg_vs_ppo(args, device, dtype)
    if args.what in ("train", "ppo"):
        return bench_training(args, device, dtype)
    args.batch = args.batch or (64 if device.type == "cuda" else 32)
    models = args.models.split(",") if args.models else (["gpu"] if device.type == "cuda" else
                                                           ["4L-128", "6L-384", "cpu"])
    modes = ["eager"] + ["compile"] * args.compile + ["cuda_graph"] * args.cuda_graph
    if not args.no_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            args.no_hf = True
            print("transformers is not installed: skipping the hf column (`pip install transformers` to add it)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device} | dtype {args.dtype} | threads {torch.get_num_threads()} | load {load:.2f} | "
          f"batch {args.batch} | prompt {args.prompt_len} tokens (half the rows {args.prompt_len // 2}, "
          f"left-padded) | {args.new_tokens} new tokens | temperature 1, no top-k | "
          f"tokens/s, median of {args.repeats}")
    rows = [bench_model(name, args, device, dtype, modes) for name in models]
    print_table(rows, modes)


def _one_iteration(preset, device, dtype, algo):
    from nanorlhf.benchmark import bench_pg, bench_ppo
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    return bench_ppo(preset, device, dtype) if algo == "ppo" else bench_pg(preset, device, dtype, algo)


def bench_pg_vs_ppo(args, device, dtype):
    """One iteration of PPO and of each critic-free method at the same number of sampled responses and
    minibatch steps, each in a fresh process: on CPU peak memory is the process's peak resident set, which
    nothing resets (flops.peak_memory_gb), so each method needs a process of its own."""
    import concurrent.futures
    import multiprocessing
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    load = os.getloadavg()[0]
    print(f"one iteration each, {preset} preset, {args.dtype} on {device} | threads {torch.get_num_threads()} | "
          f"load {load:.2f} on {os.cpu_count()} cores")
    print(f"{'method':<10} {'rollout':>8} {'score':>8} {'ref(+V)':>8} {'learn':>8} {'total s':>8} {'peak GB':>8}")
    for algo in args.algos.split(","):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            r = pool.submit(_one_iteration, preset, str(device), dtype, algo).result()
        print(f"{algo:<10} {r['rollout_s']:8.2f} {r['score_s']:8.2f} {r['ref_value_s']:8.2f} {r['learn_s']:8.2f} "
              f"{r['total_s']:8.2f} {r['peak_mem_gb']:8.2f}", flush=True)
    print(f"{r['rollout_batch']} responses x up to {r['max_new_tokens']} tokens each; load after "
          f"{os.getloadavg()[0]:.2f}")


def bench_training(args, device, dtype):
    from nanorlhf.benchmark import bench_ppo, bench_sft
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    if args.what == "ppo":
        r = bench_ppo(preset, device, dtype, compile=args.compile, compile_mode=args.compile_mode)
        print(f"one PPO iteration, {preset} preset, {args.dtype}, {r['rollout_batch']} rollouts x up to "
              f"{r['max_new_tokens']} tokens on {device}:")
        for part in ("rollout_s", "score_s", "ref_value_s", "learn_s"):
            print(f"  {part[:-2]:<10} {r[part]:7.3f} s  {r[part] / r['total_s']:5.1%}")
        print(f"  total      {r['total_s']:7.3f} s | rollout {r['rollout_tokens_per_s']:,.0f} tokens/s | "
              f"peak memory {r['peak_mem_gb']:.2f} GB")
        return
    dtypes = [dtype, torch.bfloat16] if device.type == "cpu" and dtype == torch.float32 else [dtype]
    for d in dtypes:
        r = bench_sft(preset, device, d, compile=args.compile, steps=args.steps, batch_size=args.batch or None,
                      loss_in_compile=args.loss_in_compile, attention=args.attention, dropout=args.dropout,
                      compile_mode=args.compile_mode)
        compiled = f" compiled ({args.compile_mode})" if r["compile"] else ""
        mfu = f"MFU {r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s" if r["mfu"] is not None else "no peak known: no MFU"
        print(f"SFT {preset} preset ({r['params_M']:.2f}M params, batch {r['batch_size']} x {r['seq_len']}), "
              f"{r['dtype']}{compiled}{' with the loss' if r['loss_in_compile'] else ''}"
              f"{f', {args.attention} attention' if args.attention else ''}, dropout {r['dropout']:g} on {device}: "
              f"{r['tokens_per_s']:,.0f} tokens/s | "
              f"{r['tflops']:.3f} TFLOP/s | {mfu} | peak memory {r['peak_mem_gb']:.2f} GB")


if __name__ == "__main__":
    main()
