"""Refuse settings that cannot work before any work starts: one line naming the flag and what it must be.
The checks read fields by name, so one set serves every stage's config (config.py calls check_config)."""
import dataclasses
import math

# torch.compile's modes for training. max-autotune-no-cudagraphs benchmarks several kernels for each matrix
# product and fused op at the first step (minutes on a GPU); its CUDA-graph variant is left out because the
# training steps here run code outside the graph (the optimizer, the non-finite check) that would break it.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


# Sizes and counts that must be >= 1: 0 or less builds no model, divides by zero or trains nothing.
POSITIVE_INTS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "sample_batch", "log_every",
                 "max_bad_steps", "batch_size", "grad_accum", "max_iters", "eval_every", "eval_iters", "sample_every",
                 "n_prompts", "k_responses", "n_raters", "epochs", "norm_samples", "eval_samples", "rollout_batch",
                 "n_minibatches", "ppo_epochs", "group_size", "epochs", "kl_horizon", "eval_prompts", "save_every")
# >= 0: none shown, no extra round, the whole corpus, PPO's final evaluation only (of --init_policy)
COUNTS = ("n_samples", "rounds", "tokenizer_chars", "iterations")
# Floats that must be > 0 (rates, scales, noise), lie in [0, 1] (discounts), or be >= 0 (0 switches them off).
POSITIVE_FLOATS = ("lr", "value_lr", "temperature", "grad_clip", "beta", "rater_noise_low",
                   "rater_noise_high", "clip_range", "clip_range_value", "target_kl")
UNIT_FLOATS = ("gamma", "lam", "baseline_decay")  # 0 <= x <= 1
NON_NEGATIVE_FLOATS = ("min_lr", "weight_decay", "vf_coef", "init_kl_coef", "kl_coef", "ptx_coef")


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
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile_mode {cfg.compile_mode!r}: {' | '.join(COMPILE_MODES)}")
