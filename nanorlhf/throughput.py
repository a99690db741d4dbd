"""How fast training runs: tokens per second and model FLOPs utilisation (MFU) of an SFT step,
and where the time of one PPO iteration goes. bench.py prints them (`bench.py train`, `bench.py ppo`).

Both build random-init models of a preset's size and feed them random tokens: no checkpoint and
no corpus needed, and the numbers are those of the same calls the train scripts make.
"""
import contextlib
import copy
import dataclasses
import resource
import time

import torch
import torch.nn.attention

from nanorlhf.config import PPOConfig, Runtime, SFTConfig, make_config, set_cuda_kernels
from nanorlhf.model import GPT, GPTConfig, ScalarGPT, join_prompt_response, logprobs_from_logits, response_logits
from nanorlhf.ppo import compute_gae, entropy_from_logits, kl_penalty_rewards, masked_whiten, policy_loss, value_loss
from nanorlhf.reward import score
from nanorlhf.sampler import generate, make_decode_step
from nanorlhf.train import backward, make_optimizer, optimizer_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Peak dense (no 2:4 sparsity) tensor-core FLOP/s of one GPU, from the vendor's data sheets:
# (bf16/fp16, fp32 matmuls run as TF32, which setup_runtime turns on). Unknown GPUs and CPUs get no
# MFU, only the achieved FLOP/s. Keys are matched against torch.cuda.get_device_name(), first match wins.
PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12),  # SXM
    "H200": (989e12, 495e12),  # the H100's compute with more and faster memory
    "A100": (312e12, 156e12),
}


# Training FLOPs per token of a GPT (Kaplan et al. 2020 Sec. 2.1; PaLM, Chowdhery et al. 2022, App. B;
# nanoGPT's estimate_mfu):  6 N + 12 L C T
#   6 N       each weight does one multiply-add (2 FLOPs) per token forwards and two backwards;
#             N = the parameters less the position embeddings (a lookup): the token embedding
#             counts through the matmul of the LM head tied to it
#   12 L C T  attention scores q k^T and their sum over v: 2 matmuls of 2 T C FLOPs per token per
#             layer forwards, x3 with the backward; causal masking's half is not subtracted
def model_flops_per_token(config, seq_len):
    """Training FLOPs per token of a GPTConfig (or a GPT) at sequence length seq_len."""
    if isinstance(config, GPTConfig):
        with torch.device("meta"):  # counts the parameters without allocating them
            config = GPT(config)
    c = config.config
    return 6 * config.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


def training_speed(model, batch_shapes, seconds, peak=None):
    """-> (tokens/s, MFU) of training steps that took `seconds` for batches of these (B, T) shapes:
    every position counts, padding included (the model computes it); MFU is the model FLOP/s over
    `peak` (peak_flops), None without one."""
    tokens = sum(B * T for B, T in batch_shapes)
    flops = sum(B * T * model_flops_per_token(model, T) for B, T in batch_shapes)
    return tokens / seconds, (flops / seconds / peak if peak else None)


def peak_flops(device, dtype):
    """Peak FLOP/s of the device at dtype, or None when not in PEAK_FLOPS (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


def _runtime(device, dtype):
    device, dtype = torch.device(device), DTYPES.get(dtype, dtype)
    if device.type == "cuda":
        set_cuda_kernels()  # as setup_runtime
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    return Runtime(device=device, dtype=dtype, scaler=scaler)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device):
    """GPU: the most memory tensors held since the last reset. CPU: the process's peak resident
    set so far (ru_maxrss, kB on Linux), which no reset lowers."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


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
    rt = _runtime(device, dtype)
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
        _reset_peak_memory(rt.device)
        _sync(rt.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(rt.device)
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
            "peak_mem_gb": _peak_memory_gb(rt.device)}


def bench_ppo(preset="gpu", device="cuda", dtype=torch.bfloat16, compile=False, warmup=None, seed=0,
              compile_mode="default"):
    """Time one PPO iteration of a preset's size and settings, phase by phase, as train_ppo.py runs it:
    rollout (generate), score (reward model), ref_value (old and reference logprobs, old values,
    rewards, GAE), learn (ppo_epochs x n_minibatches clipped-loss steps of policy and value model).
    Random-init models; <|endoftext|> is the last id, which random weights rarely draw, so every
    response runs to max_new_tokens: the longest iteration.
    compile: as train_ppo.py --compile, the training forwards (compile_mode) and the rollout's decode step
    (a CUDA graph on GPU, torch.compile on CPU). warmup: untimed iterations first, default 1, or 2 when
    compiling (on CPU the second iteration still recompiled: 9 s, then 0.06 s, tiny preset)."""
    warmup = warmup if warmup is not None else 2 if compile else 1
    rt = _runtime(device, dtype)
    cfg = make_config(PPOConfig, "ppo", preset=preset)
    B, P, N = cfg.rollout_batch, cfg.max_prompt_tokens, cfg.max_new_tokens
    minibatch = B // cfg.n_minibatches
    torch.manual_seed(seed)
    config = model_config(cfg)
    policy = GPT(config).to(rt.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = ScalarGPT(config).to(rt.device).eval().requires_grad_(False)
    value_model = ScalarGPT(config).to(rt.device)
    policy_opt = make_optimizer(policy, cfg.lr, 0.0, rt.device)
    value_opt = make_optimizer(value_model, cfg.value_lr, 0.0, rt.device)
    policy_train, value_train = (torch.compile(m, mode=compile_mode) if compile else m
                                 for m in (policy, value_model))
    decode_step = None
    if compile:
        decode_step = make_decode_step(policy, "cuda_graph" if rt.device.type == "cuda" else "compile")
    eos = config.vocab_size - 1
    generator = torch.Generator(rt.device).manual_seed(seed)
    prompt = torch.randint(0, eos, (B, P), device=rt.device, generator=generator)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[B // 2:, :P // 2] = 0  # half the rows left-padded to half length, as real prompts
    prompt = prompt.masked_fill(prompt_mask == 0, eos)

    def values_of(model, *args):  # as train_ppo.values_of: V(s_t) for each response token, fp32 (b, N)
        idx, mask, pos = join_prompt_response(*args)
        return model(idx, position_ids=pos, attention_mask=mask)[:, P - 1:-1].float()

    def iteration():
        times = {}
        t = time.perf_counter()
        with rt.autocast():
            rollout = generate(policy.eval(), prompt, prompt_mask, N, eos_id=eos, generator=generator,
                               decode_step=decode_step)
        policy.train()
        response, mask = rollout["tokens"], rollout["mask"]
        _sync(rt.device)
        times["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
        with torch.no_grad(), rt.autocast():
            scores = score(rm, prompt, prompt_mask, response, mask)
        _sync(rt.device)
        times["score_s"], t = time.perf_counter() - t, time.perf_counter()
        old_logprobs, ref_logprobs, old_values = (torch.zeros_like(mask, dtype=torch.float) for _ in range(3))
        with torch.no_grad(), rt.autocast():
            for mb in torch.arange(B, device=rt.device).split(minibatch):
                args = (prompt[mb], prompt_mask[mb], response[mb], mask[mb])
                old_logprobs[mb] = logprobs_from_logits(response_logits(policy_train, *args), response[mb])
                ref_logprobs[mb] = logprobs_from_logits(response_logits(reference, *args), response[mb])
                old_values[mb] = values_of(value_train, *args)
            rewards = kl_penalty_rewards(scores, old_logprobs, ref_logprobs, mask, cfg.init_kl_coef)
            advantages, returns = compute_gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)
        _sync(rt.device)
        times["ref_value_s"], t = time.perf_counter() - t, time.perf_counter()
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(B, device=rt.device, generator=generator).split(minibatch):
                args = (prompt[mb], prompt_mask[mb], response[mb], mask[mb])
                with rt.autocast():
                    logits = response_logits(policy_train, *args)  # (b, N, V)
                    values = values_of(value_train, *args)  # (b, N)
                new_logprobs = logprobs_from_logits(logits, response[mb])  # fp32 from here on
                pg_loss, _ = policy_loss(new_logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
                vf_loss, _ = value_loss(values, old_values[mb], returns[mb], mask[mb], cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                backward(loss, rt)
                optimizer_step(policy, policy_opt, rt, cfg.grad_clip, update_scaler=False)
                optimizer_step(value_model, value_opt, rt, cfg.grad_clip)
                float(loss.detach())  # train_ppo's NonFiniteGuard reads the loss every step: a host sync
                with torch.no_grad():
                    entropy_from_logits(logits.float(), mask[mb])  # its per-minibatch statistics
        _sync(rt.device)
        times["learn_s"] = time.perf_counter() - t
        return times, int(mask.sum())

    for _ in range(warmup):
        iteration()
    _reset_peak_memory(rt.device)
    times, response_tokens = iteration()
    total = sum(times.values())
    return {**times, "total_s": total, "rollout_batch": B, "max_new_tokens": N, "response_tokens": response_tokens,
            "rollout_tokens_per_s": response_tokens / times["rollout_s"], "dtype": str(rt.dtype), "compile": compile,
            "peak_mem_gb": _peak_memory_gb(rt.device)}
