"""Configs, presets and the run-time set-up (device, precision, seeds, DDP) decided once.

Each script has one dataclass of settings; every field is a --flag of the same
name. The order of precedence: dataclass default < preset < command line.
"""
import argparse
import contextlib
import dataclasses
import inspect
import os
import random
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from nanorlhf.data import FULL_PATH

# Presets: values that differ between a test run (tiny), a laptop (cpu) and one GPU (gpu).
# "all" applies to every stage; a stage's own table overrides it. Fields a stage lacks are skipped.
# A preset's "tinystories_full" table (its own "all" and stages) overrides both when the run reads the
# full TinyStories (make_config).
PRESETS = {
    "tiny": {
        "all": dict(vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=96, max_prompt_tokens=24,
                    max_new_tokens=24, tokenizer_chars=200_000),
        "sft": dict(max_iters=8, batch_size=8, eval_every=4, eval_iters=2, sample_every=4, warmup_iters=2),
        "rm": dict(n_prompts=32, k_responses=2, batch_size=8, epochs=1, norm_samples=16, eval_samples=16),
        "ppo": dict(iterations=2, rollout_batch=8, n_minibatches=2, eval_prompts=8, sample_every=1),
        "dpo": dict(max_iters=4, batch_size=8),
        "eval": dict(n_prompts=8),
        "study": dict(iterations=3, eval_prompts=8),
    },
    "cpu": {
        "all": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=192, block_size=256, max_prompt_tokens=32,
                    max_new_tokens=224),
        "sft": dict(max_iters=800, batch_size=16, eval_every=100, eval_iters=8, sample_every=200, warmup_iters=50),
        "rm": dict(n_prompts=2000, k_responses=4, batch_size=16, epochs=2, lr=3e-4, norm_samples=256, eval_samples=512),
        "ppo": dict(iterations=30, rollout_batch=64, n_minibatches=4, eval_prompts=128, sample_every=5, lr=5e-5,
                    value_lr=1e-4, init_kl_coef=0.1),
        "dpo": dict(max_iters=150, batch_size=16, lr=5e-5),
        "tinystories_full": {"all": dict(tokenizer_chars=20_000_000)},  # a BPE on 2 GB of text would take hours
    },
    # gpu: GPT-2-small's shape (12 x 768). Its stage tables are sized for the bundled 853-story sample, whose
    # 178k training tokens the model memorises in ~20 epochs (train_sft keeps the best validation checkpoint)
    # and whose BPE runs out of merges before 8,192 tokens; "tinystories_full" replaces them when the run
    # uses the full TinyStories (the default once data/TinyStoriesV2-GPT4-train.txt is there).
    "gpu": {
        "all": dict(vocab_size=4096, n_layer=12, n_head=12, n_embd=768, block_size=512, max_prompt_tokens=64,
                    max_new_tokens=256, sample_batch=256),
        "sft": dict(max_iters=240, batch_size=64, lr=6e-4, min_lr=6e-5, eval_every=10, eval_iters=4,
                    sample_every=80, warmup_iters=10),
        "rm": dict(n_prompts=1600, k_responses=4, batch_size=16, epochs=2, lr=1e-4, norm_samples=1024,
                   eval_samples=1024),
        "ppo": dict(iterations=40, rollout_batch=256, n_minibatches=4, eval_prompts=512, sample_every=10, lr=2e-5,
                    value_lr=1e-4, init_kl_coef=0.1, save_every=10),
        "dpo": dict(max_iters=300, batch_size=64, lr=1e-5),
        "eval": dict(n_prompts=512),
        "study": dict(iterations=100, eval_prompts=512),
        # 2.1M stories (~470M tokens): SFT sees ~80M of them; the BPE learns from the first 20M characters
        "tinystories_full": {
            "all": dict(tokenizer_chars=20_000_000),
            # no dropout: SFT sees each of these ~80M tokens about once, too few repeats to memorise
            "sft": dict(max_iters=5000, eval_every=250, eval_iters=20, sample_every=500, warmup_iters=200,
                        sft_dropout=0.0),
            "rm": dict(n_prompts=8000, epochs=1),
            "ppo": dict(iterations=200, sample_every=20, save_every=20),
            "dpo": dict(max_iters=2000),
            "study": dict(iterations=300),
        },
    },
}


@dataclass
class CommonConfig:
    """Settings every stage shares: data, tokenizer, model shape, run-time."""
    preset: str = ""  # tiny | cpu | gpu; empty means gpu when CUDA is present, else cpu
    out_dir: str = ""  # where checkpoints, metrics and plots go; empty means out/<stage>
    seed: int = 1337  # seeds python, numpy and torch
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile training (SFT: with its loss) and PPO's rollout step (a CUDA graph on GPU)
    compile_mode: str = "default"  # with --compile: default | max-autotune-no-cudagraphs (tunes kernels: minutes)
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass: less memory, ~30% slower
    resume: bool = False  # continue from out_dir/ckpt.pt
    dataset: str = "auto"  # auto | sample (data/tinystories_sample.txt) | tinystories_full (downloaded) | a path
    tokenizer: str = "bpe"  # bpe (trained on the corpus) | gpt2 (tiktoken's GPT-2 encoding)
    vocab_size: int = 2048  # BPE vocabulary size including <|endoftext|>
    tokenizer_chars: int = 0  # train the BPE on the first N characters only (0 = all)
    block_size: int = 256  # longest sequence the model sees (prompt + response)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 192  # model width
    max_prompt_tokens: int = 32  # prompts are cut to their last N tokens (with a warning)
    max_new_tokens: int = 224  # longest response
    sample_batch: int = 64  # prompts sampled at once when collecting responses (RM data, evaluation)
    temperature: float = 1.0  # sampling temperature; divides the logits in every logprob pass too
    log_every: int = 1  # console/JSONL line every N steps
    max_bad_steps: int = 5  # stop after this many optimizer steps in a row with a non-finite loss or gradient


@dataclass
class SFTConfig(CommonConfig):
    init_from: str = "scratch"  # scratch | gpt2 (Hugging Face GPT-2 weights, needs internet once)
    loss_on: str = "auto"  # all tokens of the story | response tokens only | auto (all from scratch, else response)
    batch_size: int = 16  # stories per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 800  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine
    warmup_iters: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the gradient norm at this
    eval_every: int = 100  # validation loss every N steps
    eval_iters: int = 8  # validation batches per evaluation
    sample_every: int = 100  # print a prompt and the model's continuation every N steps
    sft_dropout: float = 0.1  # dropout while training from scratch (the saved model runs with dropout 0)


@dataclass
class RMConfig(CommonConfig):
    sft_dir: str = "out/sft"  # the SFT checkpoint the reward model starts from
    prefs: str = ""  # a JSONL preference file to train on; empty = simulate raters on SFT samples
    policy_dir: str = ""  # iterated RLHF: compare samples of this policy (empty = SFT); the RM still starts from SFT
    extra_prefs: str = ""  # iterated RLHF: earlier pairs (a prefs.jsonl) added to the new ones; prefs.jsonl keeps both
    n_prompts: int = 2000  # prompts to collect simulated comparisons on
    k_responses: int = 4  # responses per prompt; k > 2 is a ranking -> k(k-1)/2 weighted pairs
    n_raters: int = 5  # simulated raters in the pool
    rater_noise_low: float = 0.02  # the most careful rater's noise (pool agreement ~73%, as InstructGPT's labelers)
    rater_noise_high: float = 0.2  # the noisiest rater's noise
    rater_bias: str = ""  # "" | length | flowery | sycophancy: a hidden taste the raters share
    rater_bias_weight: float = 0.2  # how strong that taste is (gold has std ~0.35 on the corpus's continuations)
    val_fraction: float = 0.1  # share of prompts held out for validation
    batch_size: int = 16  # prompts per step, each with all its pairs (k responses, one forward pass each)
    epochs: int = 2  # passes over the pairs
    lr: float = 3e-4  # learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm at this
    norm_samples: int = 256  # fresh SFT samples used to normalise the reward to mean 0, std 1
    eval_samples: int = 512  # fresh SFT samples for the RM-vs-gold Spearman correlation


@dataclass
class PPOConfig(CommonConfig):
    sft_dir: str = "out/sft"  # policy and reference start here
    rm_dir: str = "out/rm"  # the reward model (value model starts from it)
    iterations: int = 30  # rollout + learn cycles
    rollout_batch: int = 64  # prompts per iteration
    n_minibatches: int = 4  # minibatches per PPO epoch
    ppo_epochs: int = 4  # passes over each rollout batch (DESIGN detail 7)
    lr: float = 5e-5  # policy learning rate
    value_lr: float = 1e-4  # value model learning rate
    grad_clip: float = 1.0  # clip the gradient norm at this
    init_kl_coef: float = 0.1  # initial beta of the KL penalty
    adaptive_kl: bool = True  # adapt beta towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # nats per response
    kl_horizon: int = 10000  # horizon of the adaptive KL controller
    gamma: float = 1.0  # discount (DESIGN detail 5)
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # PPO ratio clip
    clip_range_value: float = 0.2  # value clip
    vf_coef: float = 0.1  # value loss coefficient
    no_eos_penalty: float = -1.0  # RM score given to responses that never emit <|endoftext|>
    eval_prompts: int = 128  # held-out prompts for the final gold evaluation
    sample_every: int = 5  # print a table of samples every N iterations
    save_every: int = 5  # checkpoint every N iterations
    init_policy: str = ""  # iterated RLHF: start the policy from this PPO checkpoint (the reference stays SFT)


@dataclass
class DPOConfig(CommonConfig):
    sft_dir: str = "out/sft"  # policy and reference start here
    rm_dir: str = "out/rm"  # where the preference pairs the RM used are stored (prefs.jsonl)
    prefs: str = ""  # a preference file; empty = out/rm/prefs.jsonl
    beta: float = 0.1  # DPO temperature (Rafailov et al. 2023)
    batch_size: int = 16  # pairs per step
    max_iters: int = 200  # optimizer steps
    lr: float = 1e-5  # learning rate
    grad_clip: float = 1.0  # clip the gradient norm at this


@dataclass
class EvalConfig(CommonConfig):
    sft_dir: str = "out/sft"  # the reference: KL and win rate are against it, best-of-n samples from it
    rm_dir: str = "out/rm"  # the reward model: the reward column and best-of-n's pick
    ckpts: str = "out/sft,out/ppo,out/dpo"  # policy checkpoint dirs, comma-separated; missing ones are skipped
    bon: str = "1,4,16"  # best-of-n from the SFT policy for each n, comma-separated; empty = none
    n_prompts: int = 128  # held-out prompts (first sentences of validation stories) every method answers
    n_samples: int = 3  # prompts whose responses from every method are shown side by side
    no_eos_penalty: float = -1.0  # best-of-n ranks a response that never ended at this reward, as PPO does


@dataclass
class StudyConfig(CommonConfig):
    sft_dir: str = ""  # the SFT checkpoint every run starts from; empty = out_dir/sft, trained if missing
    rater_bias: str = "length,flowery"  # the raters' hidden taste, one reward model and curve each (none = no bias)
    rater_bias_weight: float = 0.2  # strength of that taste (train_rm.py --rater_bias_weight)
    iterations: int = 90  # PPO iterations per run; rounds splits them into rounds + 1 segments
    kl_coef: float = 0.01  # the weak, fixed KL penalty of overoptimization and rounds
    betas: str = "0.01,0.03,0.1,0.3"  # beta_sweep: one PPO run per fixed KL coefficient
    rounds: int = 2  # rounds: extra rounds of fresh preferences on the current policy
    eval_prompts: int = 128  # held-out prompts for every PPO run's final evaluation and each round's measures


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def default_preset():
    return "gpu" if torch.cuda.is_available() else "cpu"


def _field_comments(cls):
    """The comment after each field in the dataclass source: it becomes the --help text."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def parse_config(cls, stage, argv=None, description=None):
    """Build cls from its defaults, the preset and the command line (every field is a --flag)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        comment = f"{comments.get(f.name, '')} (default {f.default!r}, or the preset's)"
        comment = comment.replace("%", "%%")  # argparse %-formats its help strings
        kind = _str2bool if f.type in (bool, "bool") else type(f.default)
        parser.add_argument(f"--{f.name}", type=kind, default=None, nargs="?" if kind is _str2bool else None,
                            const=True if kind is _str2bool else None, help=comment or f.name)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return make_config(cls, stage, **given)
    except ValueError as e:  # an impossible combination: the message, not a traceback
        parser.error(str(e))


def make_config(cls, stage, **overrides):
    """The config for a stage: defaults < preset < overrides. Also the form tests use."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} for {cls.__name__}; see --help")
    preset = overrides.get("preset") or default_preset()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    # dataset auto: the full TinyStories with the gpu preset once it has been downloaded, else the sample
    dataset = overrides.get("dataset") or "auto"
    if dataset == "auto":
        dataset = "tinystories_full" if preset == "gpu" and os.path.exists(FULL_PATH) else "sample"
    # a preset's sizes for the full corpus, where it has them
    data_table = PRESETS[preset].get("tinystories_full", {}) if dataset == "tinystories_full" else {}
    values = {**PRESETS[preset]["all"], **PRESETS[preset].get(stage, {}), **data_table.get("all", {}),
              **data_table.get(stage, {})}
    values = {k: v for k, v in values.items() if k in names}
    values.update(overrides)
    values["dataset"] = dataset
    values["preset"] = preset
    values["out_dir"] = values.get("out_dir") or os.path.join("out", stage)
    cfg = cls(**values)
    check_config(cfg)
    return cfg


# torch.compile's modes for training. max-autotune-no-cudagraphs benchmarks several kernels for each matrix
# product and fused op at the first step (minutes on a GPU); its CUDA-graph variant is left out because the
# training steps here run code outside the graph (the optimizer, the non-finite check) that would break it.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_config(cfg):
    """Refuse settings that cannot work, saying which and why."""
    # counts and periods: 0 would divide by zero or train nothing
    for name in ("batch_size", "grad_accum", "eval_every", "eval_iters", "sample_every", "save_every", "log_every",
                 "rollout_batch", "n_minibatches", "sample_batch", "ppo_epochs", "epochs", "max_bad_steps",
                 "n_prompts", "max_iters"):
        if getattr(cfg, name, 1) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_prompt_tokens < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"max_prompt_tokens and max_new_tokens must be >= 1, got {cfg.max_prompt_tokens} and "
                         f"{cfg.max_new_tokens}")
    for name in ("lr", "value_lr"):
        if getattr(cfg, name, 1.0) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if getattr(cfg, "loss_on", "auto") not in ("auto", "all", "response"):
        raise ValueError(f"unknown loss_on {cfg.loss_on!r}: auto | all | response")
    if cfg.max_prompt_tokens + cfg.max_new_tokens > cfg.block_size:
        raise ValueError(f"max_prompt_tokens ({cfg.max_prompt_tokens}) + max_new_tokens ({cfg.max_new_tokens}) "
                         f"> block_size ({cfg.block_size}): raise block_size or shorten them")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise ValueError(f"vocab_size {cfg.vocab_size} must be > 256 (the byte tokens plus <|endoftext|>)")
    if isinstance(cfg, PPOConfig) and cfg.rollout_batch % cfg.n_minibatches:
        raise ValueError(f"rollout_batch ({cfg.rollout_batch}) must be divisible by n_minibatches "
                         f"({cfg.n_minibatches})")
    if cfg.temperature <= 0:
        raise ValueError("temperature must be > 0")
    # the reward model's settings, checked before minutes of sampling responses
    if isinstance(cfg, RMConfig) and not 0 < cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (a share of the prompts), got {cfg.val_fraction}")
    if isinstance(cfg, RMConfig) and cfg.norm_samples < 2:
        raise ValueError(f"norm_samples must be >= 2 (the reward is scaled by their spread), got {cfg.norm_samples}")
    if isinstance(cfg, RMConfig) and not cfg.prefs:
        if cfg.k_responses < 2:
            raise ValueError(f"k_responses must be >= 2 (a comparison needs two responses), got {cfg.k_responses}")
        if cfg.n_raters < 2:
            raise ValueError(f"n_raters must be >= 2 (the inter-rater agreement compares raters), got {cfg.n_raters}")
        if cfg.rater_bias not in ("", "length", "flowery", "sycophancy"):
            raise ValueError(f"unknown rater_bias {cfg.rater_bias!r}: '' (none) | length | flowery | sycophancy")
        if not 0 < cfg.rater_noise_low <= cfg.rater_noise_high:
            raise ValueError(f"need 0 < rater_noise_low <= rater_noise_high, got {cfg.rater_noise_low}, "
                             f"{cfg.rater_noise_high}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile_mode {cfg.compile_mode!r}: {' | '.join(COMPILE_MODES)}")


@dataclass
class Runtime:
    """Device and precision, decided once. autocast() wraps every forward pass."""
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    world_size: int = 1
    scaler: object = field(default=None, repr=False)

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _plain_warning(message, category, filename, lineno, line=None):
    return f"{category.__name__}: {message}\n"  # a notice for the user, not a source line to debug


def setup_runtime(cfg):
    """Pick device and precision, seed everything, and join DDP when launched by torchrun."""
    warnings.formatwarning = _plain_warning  # the scripts' warnings (a prompt cut to fit) print as one plain line
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if getattr(cfg, "batch_size", world_size) < world_size:  # each process takes rows rank::world_size of a batch
        raise SystemExit(f"batch_size {cfg.batch_size} is smaller than the {world_size} processes: raise it")
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = cfg.device
    if world_size > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    device = torch.device(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if cfg.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32  # bf16 autocast is slower than fp32 on most CPUs (bench.py measures it)
    elif dtype is None:
        raise ValueError(f"unknown dtype {cfg.dtype!r}: auto | float32 | bfloat16 | float16")
    if dtype == torch.float16 and device.type != "cuda":
        # fp16 needs loss scaling, and torch's GradScaler works on CUDA only (elsewhere it switches itself off
        # and steps with non-finite gradients): refuse rather than train on unscaled fp16 gradients
        raise SystemExit(f"--dtype float16 needs a CUDA GPU (its loss scaling runs there); on {device.type} use "
                         f"--dtype bfloat16 or float32")
    if device.type == "cuda":
        set_cuda_kernels()
    seed_everything(cfg.seed + rank)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Runtime(device=device, dtype=dtype, rank=rank, world_size=world_size, scaler=scaler)


def set_cuda_kernels():
    """TF32 for fp32 matrix products, and no cuDNN attention. cuDNN's attention kernel builds a plan for
    each new shape: a rollout's key width grows by one every step, and each new prompt width brings 256
    new shapes (on an H100 with torch 2.11 some PPO rollouts took 14 s instead of 1.4 s; none did with it
    off). SDPA's flash and memory-efficient kernels need no plan."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_config(cfg):
    print(f"{type(cfg).__name__}:")
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k} = {v!r}")
