"""Benchmarks of the real training code: tokens/s and MFU of an SFT step, and where the time of one PPO
iteration goes. bench.py prints them (`bench.py train`, `bench.py ppo`).

Both build random-init models of a preset's size and feed them random tokens: no checkpoint and no corpus
needed. bench_ppo calls the phase functions of nanorlhf/ppo_step.py that train_ppo.py calls, so it times
exactly what training runs.
"""
import contextlib
import copy
import dataclasses
import time

import torch
import torch.nn.attention

from nanorlhf.config import PGConfig, PPOConfig, SFTConfig, make_config
from nanorlhf.flops import model_flops_per_token, peak_flops, peak_memory_gb, reset_peak_memory, sync, training_speed
from nanorlhf.guard import NonFiniteGuard
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.optim import backward, make_optimizer, optimizer_step
from nanorlhf.pg import RunningMeanBaseline
from nanorlhf.pg_step import kl_estimator_of, pg_advantages, pg_update
from nanorlhf.ppo_step import advantages, old_and_reference_logprobs, ppo_update, rollout, score_responses
from nanorlhf.runtime import DTYPES, Runtime, set_cuda_kernels
from nanorlhf.sampler import make_decode_step


def bench_runtime(device, dtype):
    device, dtype = torch.device(device), DTYPES.get(dtype, dtype)
    if device.type == "cuda":
        set_cuda_kernels()  # as setup_runtime
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    return Runtime(device=device, dtype=dtype, scaler=scaler)


def model_config(cfg, dropout=0.0):
    """The GPTConfig of a stage config's model shape (the vocabulary as the preset asks for it)."""
    return GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=dropout)


def bench_sft(preset_or_config="gpu", device="cuda", dtype=torch.bfloat16, compile=False, steps=10,
              batch_size=None, grad_checkpoint=False, warmup=2, loss_in_compile=False, attention="", dropout=None,
              compile_mode="default"):
    """Time `steps` SFT training steps (forward, fp32 cross-entropy, backward, clipped AdamW step)
    on batches of random tokens, block_size long, after `warmup` steps (compilation, allocator).
    preset_or_config: a preset name (its model, SFT batch size and dropout, as train_sft.py would
    resolve them here) or a GPTConfig (give batch_size). dropout: None = the preset's (or the config's).
    loss_in_compile: compile the cross-entropy with the model (one graph: the fp32 logits are never
    written out whole) instead of the model alone. attention: "" lets SDPA choose its kernel;
    flash | efficient | cudnn forces one. compile_mode: torch.compile's mode (config.COMPILE_MODES)."""
    if isinstance(preset_or_config, str):
        sft = make_config(SFTConfig, "sft", preset=preset_or_config)
        config, batch_size = model_config(sft, sft.sft_dropout), batch_size or sft.batch_size
    else:
        config, batch_size = preset_or_config, batch_size or 8
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    rt = bench_runtime(device, dtype)
    torch.manual_seed(0)
    model = GPT(config).to(rt.device).train()
    model.grad_checkpoint = grad_checkpoint
    optimizer = make_optimizer(model, 1e-4, 0.1, rt.device)
    B, T = batch_size, config.block_size
    x = torch.randint(0, config.vocab_size, (B, T), device=rt.device)
    y = torch.randint(0, config.vocab_size, (B, T), device=rt.device)

    def sft_loss(model, x, y):
        with rt.autocast():
            logits = model(x)  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # fp32, as train_sft

    trained = torch.compile(model, mode=compile_mode) if compile and not loss_in_compile else model
    loss_fn = torch.compile(sft_loss, mode=compile_mode) if compile and loss_in_compile else sft_loss

    def step():
        backward(loss_fn(trained, x, y), rt)
        optimizer_step(model, optimizer, rt, grad_clip=1.0)

    backends = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    if attention and attention not in backends:
        raise ValueError(f"unknown attention kernel {attention!r}: flash | efficient | cudnn")
    with (torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backends[attention]))
          if attention else contextlib.nullcontext()):
        for _ in range(warmup):
            step()
        reset_peak_memory(rt.device)
        sync(rt.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(rt.device)
    seconds = (time.perf_counter() - t0) / steps
    peak = peak_flops(rt.device, rt.dtype)
    tokens_per_s, mfu = training_speed(model, [(B, T)], seconds, peak)
    flops_per_token = model_flops_per_token(model, T)
    flops = flops_per_token * tokens_per_s  # achieved FLOP/s
    return {"params_M": model.num_params() / 1e6, "batch_size": B, "seq_len": T, "dtype": str(rt.dtype),
            "compile": compile, "compile_mode": compile_mode, "loss_in_compile": loss_in_compile,
            "attention": attention or "sdpa's choice", "dropout": config.dropout,
            "grad_checkpoint": grad_checkpoint, "step_s": seconds,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token, "tflops": flops / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": mfu,
            "peak_mem_gb": peak_memory_gb(rt.device)}


def random_models_and_prompts(cfg, rt, seed):
    """Random-init policy, its frozen copy (the reference) and a reward model of cfg's size, and a batch of
    cfg.rollout_batch random prompts (half the rows left-padded to half length, as real prompts).
    <|endoftext|> is the last id, which random weights rarely draw: every response runs to max_new_tokens."""
    B, P = cfg.rollout_batch, cfg.max_prompt_tokens
    torch.manual_seed(seed)
    config = model_config(cfg)
    policy = GPT(config).to(rt.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = ScalarGPT(config).to(rt.device).eval().requires_grad_(False)
    eos = config.vocab_size - 1
    generator = torch.Generator(rt.device).manual_seed(seed)
    prompt = torch.randint(0, eos, (B, P), device=rt.device, generator=generator)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[B // 2:, :P // 2] = 0
    return policy, reference, rm, prompt.masked_fill(prompt_mask == 0, eos), prompt_mask, eos, generator


class Phases:
    """The wall-clock of an iteration's phases, each ended by a device sync: times[name] in seconds."""

    def __init__(self, device):
        self.device, self.times, self.t = device, {}, time.perf_counter()

    def end(self, name):
        assert name not in self.times, f"phase {name} timed twice"
        sync(self.device)
        now = time.perf_counter()
        self.times[name], self.t = now - self.t, now


def time_iteration(iteration, warmup, rt, B, N, **extra):
    """`warmup` untimed calls of iteration() -> (phase times, response tokens), then one timed: its phases,
    their total, the rollout's tokens per second and the peak memory (on a GPU that of the timed iteration; on a
    CPU the process's peak so far, which no reset lowers: bench.py runs each method in a fresh process)."""
    for _ in range(warmup):
        iteration()
    reset_peak_memory(rt.device)
    times, response_tokens = iteration()
    return {**times, **extra, "total_s": sum(times.values()), "rollout_batch": B, "max_new_tokens": N,
            "response_tokens": response_tokens, "rollout_tokens_per_s": response_tokens / times["rollout_s"],
            "dtype": str(rt.dtype), "peak_mem_gb": peak_memory_gb(rt.device)}


def bench_pg(preset="gpu", device="cuda", dtype=torch.bfloat16, algo="grpo", warmup=1, seed=0):
    """Time one iteration of a critic-free method (train_pg.py's calls) at a preset's size, phase by phase as
    bench_ppo, with the same number of sampled responses (rollout_batch) and minibatch steps as PPO's
    (epochs x n_minibatches): rollout, score, ref (old and reference logprobs, advantages: no value model),
    learn (pg_update). The prompts are random; group structure does not change the cost."""
    rt = bench_runtime(device, dtype)
    cfg = make_config(PGConfig, "pg", preset=preset, algo=algo)
    B, N = cfg.rollout_batch, cfg.max_new_tokens
    minibatch_size = B // cfg.n_minibatches
    policy, reference, rm, prompt, prompt_mask, eos, generator = random_models_and_prompts(cfg, rt, seed)
    policy_opt = make_optimizer(policy, cfg.lr, 0.0, rt.device)
    guard = NonFiniteGuard(cfg.max_bad_steps, "", {"lr": cfg.lr}, rt.dtype)
    baseline = RunningMeanBaseline(cfg.baseline_decay)

    def iteration():
        phase = Phases(rt.device)
        batch = rollout(policy, prompt, prompt_mask, N, cfg.temperature, eos, rt, generator)
        phase.end("rollout_s")
        scores, _ = score_responses(rm, 1.0, 0.0, batch, eos, cfg.no_eos_penalty, rt)
        phase.end("score_s")
        first_order = torch.randperm(B, generator=generator, device=rt.device)
        batch["old_logprobs"], batch["ref_logprobs"], _ = old_and_reference_logprobs(
            policy, reference, None, batch, first_order, minibatch_size, cfg.temperature, rt)
        batch["advantages"], _ = pg_advantages(algo, scores, batch["old_logprobs"], batch["ref_logprobs"],
                                               batch["mask"], cfg.group_size, cfg.kl_coef,
                                               kl_estimator_of(algo, cfg.kl_estimator), baseline)
        phase.end("ref_value_s")
        pg_update(policy, policy_opt, batch, first_order, minibatch_size, cfg, rt, generator, guard, 0)
        phase.end("learn_s")
        return phase.times, int(batch["mask"].sum())

    return time_iteration(iteration, warmup, rt, B, N, algo=algo, compile=False)


def bench_ppo(preset="gpu", device="cuda", dtype=torch.bfloat16, compile=False, warmup=None, seed=0,
              compile_mode="default"):
    """Time one PPO iteration of a preset's size and settings, phase by phase, with train_ppo.py's own calls:
    rollout (rollout), score (score_responses), ref_value (old_and_reference_logprobs, advantages),
    learn (ppo_update: ppo_epochs x n_minibatches clipped-loss steps of policy and value model, guard included).
    Random-init models; <|endoftext|> is the last id, which random weights rarely draw, so every
    response runs to max_new_tokens: the longest iteration.
    compile: as train_ppo.py --compile, the training forwards (compile_mode) and the rollout's decode step
    (a CUDA graph on GPU, torch.compile on CPU). warmup: untimed iterations first, default 1, or 2 when
    compiling (on CPU the second iteration still recompiled: 9 s, then 0.06 s, tiny preset)."""
    warmup = warmup if warmup is not None else 2 if compile else 1
    rt = bench_runtime(device, dtype)
    cfg = make_config(PPOConfig, "ppo", preset=preset, compile_mode=compile_mode)
    B, N = cfg.rollout_batch, cfg.max_new_tokens
    minibatch_size = B // cfg.n_minibatches
    policy, reference, rm, prompt, prompt_mask, eos, generator = random_models_and_prompts(cfg, rt, seed)
    value_model = ScalarGPT(policy.config).to(rt.device)
    policy_opt = make_optimizer(policy, cfg.lr, 0.0, rt.device)
    value_opt = make_optimizer(value_model, cfg.value_lr, 0.0, rt.device)
    policy_train, value_train = (torch.compile(m, mode=compile_mode) if compile else m
                                 for m in (policy, value_model))
    decode_step = None
    if compile:
        decode_step = make_decode_step(policy, "cuda_graph" if rt.device.type == "cuda" else "compile")
    guard = NonFiniteGuard(cfg.max_bad_steps, "", {"lr": cfg.lr}, rt.dtype)  # reads the loss each step, as training

    def iteration():
        phase = Phases(rt.device)
        batch = rollout(policy, prompt, prompt_mask, N, cfg.temperature, eos, rt, generator, decode_step)
        phase.end("rollout_s")
        scores, _ = score_responses(rm, 1.0, 0.0, batch, eos, cfg.no_eos_penalty, rt)
        phase.end("score_s")
        first_order = torch.randperm(B, generator=generator, device=rt.device)
        batch["old_logprobs"], batch["ref_logprobs"], batch["old_values"] = old_and_reference_logprobs(
            policy_train, reference, value_train, batch, first_order, minibatch_size, cfg.temperature, rt)
        batch["advantages"], batch["returns"] = advantages(scores, batch["old_logprobs"], batch["ref_logprobs"],
                                                           batch["old_values"], batch["mask"], cfg.init_kl_coef,
                                                           cfg.gamma, cfg.lam, rt)
        phase.end("ref_value_s")
        ppo_update(policy_train, value_train, policy_opt, value_opt, batch, first_order, minibatch_size, cfg, rt,
                   generator, guard, 0)
        phase.end("learn_s")
        return phase.times, int(batch["mask"].sum())

    return time_iteration(iteration, warmup, rt, B, N, compile=compile)
