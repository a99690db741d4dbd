"""Refuse settings that cannot work before any work starts: one line naming the flag and what it must be.
The checks read fields by name, so one set serves every stage's config (config.py calls check_config)."""
import dataclasses
import math

import torch

# torch.compile's modes for training. max-autotune-no-cudagraphs benchmarks several kernels for each matrix
# product and fused op at the first step (minutes on a GPU); its CUDA-graph variant is left out because the
# training steps here run code outside the graph (the optimizer, the non-finite check) that would break it.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


# Sizes and counts that must be >= 1: 0 or less builds no model, divides by zero or trains nothing.
POSITIVE_INTS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "sample_batch", "log_every",
                 "max_bad_steps", "batch_size", "grad_accum", "max_iters", "eval_every", "eval_iters", "sample_every",
                 "n_prompts", "k_responses", "n_raters", "epochs", "norm_samples", "eval_samples", "rollout_batch",
                 "n_minibatches", "ppo_epochs", "group_size", "kl_horizon", "eval_prompts", "save_every", "bon_prompts",
                 "monitor_patience")
# >= 0: none shown, no extra round, the whole corpus, PPO's final evaluation only (of --init_policy)
COUNTS = ("n_samples", "rounds", "tokenizer_chars", "iterations")
# Floats that must be > 0 (rates, scales, noise), lie in [0, 1] (discounts), or be >= 0 (0 switches them off).
POSITIVE_FLOATS = ("lr", "value_lr", "temperature", "grad_clip", "beta", "rater_noise_low",
                   "rater_noise_high", "clip_range", "clip_range_value", "target_kl")
UNIT_FLOATS = ("gamma", "lam", "baseline_decay")  # 0 <= x <= 1
NON_NEGATIVE_FLOATS = ("min_lr", "weight_decay", "vf_coef", "init_kl_coef", "kl_coef", "ptx_coef",
                       "ensemble_lambda")  # a negative lambda would reward the members' disagreement


def _check_numbers(cfg):
    """Every float finite (nan and inf pass a `<= 0` test and poison a run later), every size >= 1,
    every rate > 0 and every share in [0, 1]; the message names the flag and what it must be."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name} {value} is not a finite number: give a real value (default {f.default})")
    for name in POSITIVE_INTS:
        if hasattr(cfg, name) and not getattr(cfg, name) >= 1:
            raise ValueError(f"{name} must be >= 1 (a size or a count), got {getattr(cfg, name)}")
    for name in POSITIVE_FLOATS:
        if hasattr(cfg, name) and not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in UNIT_FLOATS:
        if hasattr(cfg, name) and not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE_FLOATS + COUNTS:
        if hasattr(cfg, name) and not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_prompt_tokens < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"max_prompt_tokens and max_new_tokens must be >= 1, got {cfg.max_prompt_tokens} and "
                         f"{cfg.max_new_tokens}")
    if hasattr(cfg, "bon_max") and not (cfg.bon_max >= 0 and cfg.bon_max & (cfg.bon_max - 1) == 0):
        raise ValueError(f"bon_max must be 0 (no best-of-n) or a power of 2 (1, 2, 4 .. 64), got {cfg.bon_max}")
    if hasattr(cfg, "sft_dropout") and not 0 <= cfg.sft_dropout < 1:
        raise ValueError(f"sft_dropout must be in [0, 1) (a probability; 1 would zero every activation), "
                         f"got {cfg.sft_dropout}")
    if hasattr(cfg, "val_fraction") and not 0 < cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (a share of the prompts), got {cfg.val_fraction}")
    # comma-separated lists of numbers: best-of-n's n and the beta sweep's KL coefficients
    for name, kind, ok, need in (("bon", int, lambda n: n >= 1, "whole numbers >= 1"),
                                 *((name, float, lambda b: math.isfinite(b) and b > 0, "finite numbers > 0")
                                   for name in ("betas", "grpo_kl_coefs", "dpo_betas"))):
        items = [x.strip() for x in str(getattr(cfg, name, "")).split(",") if x.strip()]
        try:
            good = all(ok(kind(x)) for x in items)
        except ValueError:
            good = False
        if not good:
            raise ValueError(f"--{name} {getattr(cfg, name)!r} must be a comma-separated list of {need}")


def check_config(cfg):
    """Refuse settings that cannot work, saying which and why."""
    _check_numbers(cfg)
    if getattr(cfg, "loss_on", "auto") not in ("auto", "all", "response"):
        raise ValueError(f"unknown loss_on {cfg.loss_on!r}: auto | all | response")
    if cfg.max_prompt_tokens + cfg.max_new_tokens > cfg.block_size:
        raise ValueError(f"max_prompt_tokens ({cfg.max_prompt_tokens}) + max_new_tokens ({cfg.max_new_tokens}) "
                         f"> block_size ({cfg.block_size}): raise block_size or shorten them")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise ValueError(f"vocab_size {cfg.vocab_size} must be > 256 (the byte tokens plus <|endoftext|>)")
    if hasattr(cfg, "n_minibatches") and cfg.rollout_batch % cfg.n_minibatches:
        raise ValueError(f"rollout_batch ({cfg.rollout_batch}) must be divisible by n_minibatches "
                         f"({cfg.n_minibatches})")
    # the reward model's settings, checked before minutes of sampling responses
    if hasattr(cfg, "norm_samples") and cfg.norm_samples < 2:
        raise ValueError(f"norm_samples must be >= 2 (the reward is scaled by their spread), got {cfg.norm_samples}")
    if hasattr(cfg, "k_responses") and not getattr(cfg, "prefs", ""):
        if cfg.k_responses < 2:
            raise ValueError(f"k_responses must be >= 2 (a comparison needs two responses), got {cfg.k_responses}")
        if cfg.n_raters < 2:
            raise ValueError(f"n_raters must be >= 2 (the inter-rater agreement compares raters), got {cfg.n_raters}")
        if cfg.rater_bias not in ("", "length", "flowery", "sycophancy"):
            raise ValueError(f"unknown rater_bias {cfg.rater_bias!r}: '' (none) | length | flowery | sycophancy")
        if not 0 < cfg.rater_noise_low <= cfg.rater_noise_high:
            raise ValueError(f"need 0 < rater_noise_low <= rater_noise_high, got {cfg.rater_noise_low}, "
                             f"{cfg.rater_noise_high}")
    if hasattr(cfg, "group_size"):  # the policy-gradient methods (train_pg.py)
        if cfg.algo not in ("reinforce", "rloo", "grpo", "drgrpo"):
            raise ValueError(f"unknown algo {cfg.algo!r}: reinforce | rloo | grpo | drgrpo")
        if cfg.kl_estimator not in ("auto", "k1", "k2", "k3"):
            raise ValueError(f"unknown kl_estimator {cfg.kl_estimator!r}: auto | k1 | k2 | k3")
        if cfg.rollout_batch % cfg.group_size or (cfg.algo != "reinforce" and cfg.group_size < 2):
            raise ValueError(f"rollout_batch ({cfg.rollout_batch}) must be a multiple of group_size "
                             f"({cfg.group_size}), and {cfg.algo} needs group_size >= 2 (a group to compare within)")
    _check_ensemble(cfg)
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile_mode {cfg.compile_mode!r}: {' | '.join(COMPILE_MODES)}")


def _check_ensemble(cfg):
    """The reward-model ensemble's flags (docs/ensembles.md): sizes, the conservative reward's name, the monitors'
    thresholds, so that none is found wrong after minutes of training."""
    from nanorlhf.ensemble import AGGREGATES  # here: ensemble.py needs the checkpoint code
    from nanorlhf.monitors import parse_thresholds
    if hasattr(cfg, "member"):  # train_rm.py
        if cfg.ensemble < 1 or cfg.member < 0:
            raise ValueError(f"ensemble must be >= 1 (1: a lone RM; 3 is usual for an ensemble), got {cfg.ensemble}"
                             if cfg.ensemble < 1 else f"member must be >= 0, got {cfg.member}")
    elif hasattr(cfg, "ensemble") and cfg.ensemble < 2:  # study.py guard compares an ensemble's rewards
        raise ValueError(f"ensemble must be >= 2 (the guard study compares the members' mean, mean - lambda std and "
                         f"min; 3 is usual), got {cfg.ensemble}")
    if getattr(cfg, "reward_ensemble", "") not in ("", *AGGREGATES):
        raise ValueError(f"unknown reward_ensemble {cfg.reward_ensemble!r}: '' (member 0) | {' | '.join(AGGREGATES)}")
    if hasattr(cfg, "monitor_thresholds"):
        parse_thresholds(cfg.monitor_thresholds)


# ---------------------------------------------------------------- memory, before the work
# A run whose batches cannot fit crashes late (the final evaluation samples --eval_prompts responses after the
# whole training) or is killed without a word. So each stage's largest tensors are counted from the settings
# before anything starts. Each count below is a LOWER bound on what is alive at once (tensors the code
# certainly holds together; activations, the allocator's slack and torch itself come on top), so a refusal is
# never wrong; a setting near the edge can still run out.
def _memory_phases(cfg, e):
    """(flag, value, bytes, what) for each phase of this stage; e: bytes per element of the compute dtype."""
    V, C, L = cfg.vocab_size, cfg.n_embd, cfg.n_layer
    P, N = cfg.max_prompt_tokens, cfg.max_new_tokens
    S = P + N
    B = cfg.sample_batch
    phases = [
        # generate: the KV cache for every layer (keys and values) + the prompt's logits
        ("sample_batch", B, B * (2 * L * S * C * e + P * V * e), "sampling a batch (KV cache, prompt logits)"),
        # response_logprobs: the full logits, logits / temperature and their log-softmax in fp32
        ("sample_batch", B, B * (S * V * e + 2 * N * V * 4), "scoring a batch (logits, log-softmax)"),
    ]
    held = 8 * S  # every sampled response is kept as int64 prompt + response tokens at least
    for flag, count, what in (("eval_prompts", 2 * getattr(cfg, "eval_prompts", 0), "the held-out responses "
                               "(policy's and SFT's)"),
                              ("n_prompts", getattr(cfg, "n_prompts", 0) * getattr(cfg, "k_responses", 0),
                               "the RM's sampled responses (n_prompts x k_responses)"),
                              ("bon_prompts", getattr(cfg, "bon_prompts", 0) * getattr(cfg, "bon_max", 0),
                               "best-of-n's samples (bon_prompts x bon_max)")):
        if count:
            phases.append((flag, getattr(cfg, flag), count * held, what))
    if hasattr(cfg, "rollout_batch"):  # a PPO minibatch: its response logits and their gradient
        M = cfg.rollout_batch // max(cfg.n_minibatches, 1)
        phases.append(("rollout_batch", cfg.rollout_batch, M * 2 * N * V * e, "a PPO minibatch (logits, gradient)"))
    elif hasattr(cfg, "grad_accum"):  # SFT: a micro-batch of whole blocks, logits and their gradient
        phases.append(("batch_size", cfg.batch_size, cfg.batch_size * 2 * cfg.block_size * V * e,
                       "an SFT micro-batch (logits, gradient)"))
    elif hasattr(cfg, "beta") and hasattr(cfg, "batch_size"):  # DPO: chosen and rejected through the policy
        phases.append(("batch_size", cfg.batch_size, cfg.batch_size * 2 * 2 * S * V * e,
                       "a DPO batch (chosen and rejected logits, gradient)"))
    return phases


def available_memory(device):
    """Bytes this process can still allocate on device: free GPU memory, or on Linux the smaller of
    MemAvailable and the cgroup's limit minus its use; None where it cannot be read (the check is skipped)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    sizes = []
    try:
        with open("/proc/meminfo") as f:
            sizes += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                sizes.append(int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return min(sizes) if sizes else None


def check_memory(cfg, device, dtype, available=None):
    """Refuse, before the work, a setting whose tensors cannot fit: one line naming the flag, what it costs,
    and the largest value that would fit."""
    available = available_memory(device) if available is None else available
    if available is None or not hasattr(cfg, "sample_batch"):
        return
    e = torch.tensor([], dtype=dtype).element_size()
    phases = _memory_phases(cfg, e)
    flag, value, need, what = max(phases, key=lambda p: p[2])
    if need > available:
        fits = min(int(v * available / n) for f, v, n, _ in phases if f == flag)  # every phase of that flag fits
        raise ValueError(f"--{flag} {value} is too large for memory: {what} takes at least {need / 2**30:.1f} GiB "
                         f"and {device.type} has {available / 2**30:.1f} GiB free: use --{flag} {fits} or less"
                         + (" (or a smaller model / shorter responses)" if fits < 1 else ""))
