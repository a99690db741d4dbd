"""Configs and presets: one dataclass of settings per script.

Every field is a --flag of the same name, and its help text sits beside its default
(arg(default, help)). The order of precedence: dataclass default < preset < command line.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass, field

import torch

from nanorlhf.checks import COMPILE_MODES, check_config  # noqa: F401 (bench.py reads COMPILE_MODES here)
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
        "pg": dict(iterations=2, rollout_batch=8, group_size=4, n_minibatches=2, eval_prompts=8, sample_every=1),
        "dpo": dict(max_iters=4, batch_size=8),
        "eval": dict(n_prompts=8),
        "study": dict(iterations=3, eval_prompts=8, bon_max=4, bon_prompts=8),
        "frontier": dict(iterations=2, eval_prompts=8, select_prompts=8, betas="0.1", grpo_kl_coefs="0.1",
                         dpo_betas="0.1", bon="1,2"),
    },
    "cpu": {
        "all": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=192, block_size=256, max_prompt_tokens=32,
                    max_new_tokens=224),
        "sft": dict(max_iters=800, batch_size=16, eval_every=100, eval_iters=8, sample_every=200, warmup_iters=50),
        "rm": dict(n_prompts=2000, k_responses=4, batch_size=16, epochs=2, lr=3e-4, norm_samples=256, eval_samples=512),
        "ppo": dict(iterations=30, rollout_batch=64, n_minibatches=4, eval_prompts=128, sample_every=5, lr=5e-5,
                    value_lr=1e-4, init_kl_coef=0.1),
        "pg": dict(iterations=30, rollout_batch=64, group_size=4, n_minibatches=4, eval_prompts=128, sample_every=5,
                   lr=5e-5),
        "frontier": dict(iterations=30, eval_prompts=128),
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
        "pg": dict(iterations=40, rollout_batch=256, group_size=4, n_minibatches=4, eval_prompts=512, sample_every=10,
                   lr=2e-5, save_every=10),
        "frontier": dict(iterations=40, eval_prompts=512, select_prompts=512),
        "dpo": dict(max_iters=300, batch_size=64, lr=1e-5),
        "eval": dict(n_prompts=512),
        "study": dict(iterations=100, eval_prompts=512, bon_prompts=256),
        # 2.1M stories (~470M tokens): SFT sees ~80M of them; the BPE learns from the first 20M characters
        "tinystories_full": {
            "all": dict(tokenizer_chars=20_000_000),
            # no dropout: SFT sees each of these ~80M tokens about once, too few repeats to memorise
            "sft": dict(max_iters=5000, eval_every=250, eval_iters=20, sample_every=500, warmup_iters=200,
                        sft_dropout=0.0),
            "rm": dict(n_prompts=8000, epochs=1),
            "ppo": dict(iterations=200, sample_every=20, save_every=20),
            "pg": dict(iterations=200, sample_every=20, save_every=20),
            "frontier": dict(iterations=200),
            "dpo": dict(max_iters=2000),
            "study": dict(iterations=300),
        },
    },
}


def arg(default, help):
    """A config field with its --help text: the same words a reader sees beside the default."""
    return field(default=default, metadata={"help": help})


@dataclass
class CommonConfig:
    """Settings every stage shares: data, tokenizer, model shape, run-time."""
    preset: str = arg("", "tiny | cpu | gpu; empty means gpu when CUDA is present, else cpu")
    out_dir: str = arg("", "where checkpoints, metrics and plots go; empty means out/<stage>")
    seed: int = arg(1337, "seeds python, numpy and torch")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = arg("auto", "auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | float32 | bfloat16 | float16")
    compile: bool = arg(False,
                        "torch.compile training (SFT: with its loss) and PPO's rollout step (a CUDA graph on GPU)")
    compile_mode: str = arg("default", "with --compile: default | max-autotune-no-cudagraphs (tunes kernels: minutes)")
    grad_checkpoint: bool = arg(False,
                                "recompute each block's activations in the backward pass: less memory, ~30% slower")
    resume: bool = arg(False, "continue from out_dir/ckpt.pt")
    dataset: str = arg("auto", "auto | sample (data/tinystories_sample.txt) | tinystories_full (downloaded) | a path")
    tokenizer: str = arg("bpe", "bpe (trained on the corpus) | gpt2 (tiktoken's GPT-2 encoding)")
    vocab_size: int = arg(2048, "BPE vocabulary size including <|endoftext|>")
    tokenizer_chars: int = arg(0, "train the BPE on the first N characters only (0 = all)")
    block_size: int = arg(256, "longest sequence the model sees (prompt + response)")
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(192, "model width")
    max_prompt_tokens: int = arg(32, "prompts are cut to their last N tokens (with a warning)")
    max_new_tokens: int = arg(224, "longest response")
    sample_batch: int = arg(64, "prompts sampled at once when collecting responses (RM data, evaluation)")
    temperature: float = arg(1.0, "sampling temperature; divides the logits in every logprob pass too")
    log_every: int = arg(1, "console/JSONL line every N steps")
    max_bad_steps: int = arg(5, "stop after this many optimizer steps in a row with a non-finite loss or gradient")


@dataclass
class SFTConfig(CommonConfig):
    init_from: str = arg("scratch", "scratch | gpt2 (Hugging Face GPT-2 weights, needs internet once)")
    loss_on: str = arg("auto",
                       "all tokens of the story | response tokens only | auto (all from scratch, else response)")
    batch_size: int = arg(16, "stories per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    max_iters: int = arg(800, "optimizer steps")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr: float = arg(1e-4, "learning rate at the end of the cosine")
    warmup_iters: int = arg(50, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, "clip the gradient norm at this")
    eval_every: int = arg(100, "validation loss every N steps")
    eval_iters: int = arg(8, "validation batches per evaluation")
    sample_every: int = arg(100, "print a prompt and the model's continuation every N steps")
    sft_dropout: float = arg(0.1, "dropout while training from scratch (the saved model runs with dropout 0)")


@dataclass
class RMConfig(CommonConfig):
    sft_dir: str = arg("out/sft", "the SFT checkpoint the reward model starts from")
    prefs: str = arg("", "a JSONL preference file to train on; empty = simulate raters on SFT samples")
    policy_dir: str = arg("",
                          "iterated RLHF: compare samples of this policy (empty = SFT); the RM still starts from SFT")
    extra_prefs: str = arg("",
                           "iterated RLHF: earlier pairs (a prefs.jsonl) added to the new ones; prefs.jsonl keeps both")
    n_prompts: int = arg(2000, "prompts to collect simulated comparisons on")
    k_responses: int = arg(4, "responses per prompt; k > 2 is a ranking -> k(k-1)/2 weighted pairs")
    n_raters: int = arg(5, "simulated raters in the pool")
    rater_noise_low: float = arg(0.02,
                                 "the most careful rater's noise (pool agreement 0.88 on cpu SFT pairs)")
    rater_noise_high: float = arg(0.2, "the noisiest rater's noise")
    rater_bias: str = arg("", "\"\" | length | flowery | sycophancy: a hidden taste the raters share")
    rater_bias_weight: float = arg(0.2, "how strong that taste is (gold has std ~0.35 on the corpus's continuations)")
    feedback: str = arg("raters", "raters | constitution: who labels the pairs (docs/constitution.md)")
    labeler: str = arg("rules", "--feedback constitution: rules | lm, the feedback model")
    labeler_dir: str = arg("", "--labeler lm: a checkpoint dir, or gpt2 (HF weights, internet once); empty = --sft_dir")
    constitution: str = arg("data/constitution.md", "--feedback constitution: the principles")
    label_clamp: str = arg("", "--feedback constitution: clamp soft labels to 'low,high', e.g. 0.4,0.6; empty = none")
    label_swap: bool = arg(True, "--feedback constitution: average with the options swapped (cancels position bias)")
    val_fraction: float = arg(0.1, "share of prompts held out for validation")
    batch_size: int = arg(16, "prompts per step, each with all its pairs (k responses, one forward pass each)")
    epochs: int = arg(2, "passes over the pairs")
    lr: float = arg(3e-4, "learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm at this")
    norm_samples: int = arg(256, "fresh SFT samples used to normalise the reward to mean 0, std 1")
    eval_samples: int = arg(512, "fresh SFT samples for the RM-vs-gold Spearman correlation")
    ensemble: int = arg(1, "reward models differing in seed and data order, in out_dir (docs/ensembles.md; 3 is usual)")
    bootstrap: bool = arg(False, "train on a bootstrap sample of the preference groups (each member its own)")
    member: int = arg(0, "set by --ensemble for members 1..K-1: share member 0's split (in the parent folder)")


@dataclass
class RLConfig(CommonConfig):
    """What train_ppo.py and train_pg.py share, and the reward-hacking guards and monitors (docs/ensembles.md)."""
    grad_clip: float = arg(1.0, "clip the gradient norm at this")
    no_eos_penalty: float = arg(-1.0, "RM score given to responses that never emit <|endoftext|>")
    eval_prompts: int = arg(128, "held-out prompts for the final gold evaluation")
    sample_every: int = arg(5, "print a table of samples every N iterations")
    save_every: int = arg(5, "checkpoint every N iterations")
    reward_ensemble: str = arg("", "'' (member 0) | mean | mean_std | min of an RM ensemble (Coste et al. 2023)")
    ensemble_lambda: float = arg(1.0, "mean_std: the reward is mean - lambda * std of the members' scores")
    monitor_patience: int = arg(3, "a monitor warns after this many consecutive iterations past its threshold")
    monitor_thresholds: str = arg("", "thresholds other than docs/ensembles.md's: disagreement_ratio=2,...")
    stop_on_monitor: bool = arg(False, "at a monitor's warning: keep the last unflagged policy, evaluate it, exit 0")


@dataclass
class PPOConfig(RLConfig):
    sft_dir: str = arg("out/sft", "policy and reference start here")
    rm_dir: str = arg("out/rm", "the reward model (value model starts from it)")
    iterations: int = arg(30, "rollout + learn cycles")
    rollout_batch: int = arg(64, "prompts per iteration")
    n_minibatches: int = arg(4, "minibatches per PPO epoch")
    ppo_epochs: int = arg(4, "passes over each rollout batch (docs/design.md detail 7)")
    lr: float = arg(5e-5, "policy learning rate")
    value_lr: float = arg(1e-4, "value model learning rate")
    init_kl_coef: float = arg(0.1, "initial beta of the KL penalty")
    adaptive_kl: bool = arg(True, "adapt beta towards target_kl (Ziegler et al. 2019)")
    target_kl: float = arg(6.0, "nats per response")
    kl_horizon: int = arg(10000, "horizon of the adaptive KL controller")
    gamma: float = arg(1.0, "discount (docs/design.md detail 5)")
    lam: float = arg(0.95, "GAE lambda")
    clip_range: float = arg(0.2, "PPO ratio clip")
    clip_range_value: float = arg(0.2, "value clip")
    vf_coef: float = arg(0.1, "value loss coefficient")
    init_policy: str = arg("", "iterated RLHF: start the policy from this PPO checkpoint (the reference stays SFT)")
    ptx_coef: float = arg(0.0, "PPO-ptx (Ouyang et al. 2022): + gamma x the LM loss on training stories; 0 = off")



@dataclass
class PGConfig(RLConfig):
    sft_dir: str = arg("out/sft", "policy and reference start here")
    rm_dir: str = arg("out/rm", "the reward model")
    algo: str = arg("rloo", "reinforce | rloo | grpo | drgrpo (docs/pg.md)")
    iterations: int = arg(30, "rollout + learn cycles")
    rollout_batch: int = arg(64, "responses per iteration (PPO's episodes): rollout_batch / group_size prompts")
    group_size: int = arg(4, "k responses sampled per prompt (the group of RLOO's and GRPO's baselines)")
    n_minibatches: int = arg(4, "minibatches per epoch")
    epochs: int = arg(4, "passes over each rollout batch (as PPO's ppo_epochs)")
    lr: float = arg(5e-5, "policy learning rate")
    kl_coef: float = arg(0.1, "beta: on the KL in the reward (reinforce, rloo) or on the KL term of the loss "
                              "(grpo, drgrpo)")
    kl_estimator: str = arg("auto", "auto (k1 in the reward, k3 in the loss) | k1 | k2 | k3 (Schulman 2020)")
    clip_range: float = arg(0.2, "ratio clip")
    baseline_decay: float = arg(0.9, "reinforce: decay of the running-mean baseline")


@dataclass
class DPOConfig(CommonConfig):
    sft_dir: str = arg("out/sft", "policy and reference start here")
    rm_dir: str = arg("out/rm", "where the preference pairs the RM used are stored (prefs.jsonl)")
    prefs: str = arg("", "a preference file; empty = out/rm/prefs.jsonl")
    beta: float = arg(0.1, "DPO temperature (Rafailov et al. 2023)")
    val_fraction: float = arg(0.1, "share of prompts (groups of pairs) held out for validation, as train_rm's")
    batch_size: int = arg(16, "pairs per step")
    max_iters: int = arg(200, "optimizer steps")
    lr: float = arg(1e-5, "learning rate")
    grad_clip: float = arg(1.0, "clip the gradient norm at this")


@dataclass
class EvalConfig(CommonConfig):
    sft_dir: str = arg("out/sft", "the reference: KL and win rate are against it, best-of-n samples from it")
    rm_dir: str = arg("out/rm", "the reward model: the reward column and best-of-n's pick")
    ckpts: str = arg("out/sft,out/ppo,out/dpo", "policy checkpoint dirs, comma-separated; missing ones are skipped")
    bon: str = arg("1,4,16", "best-of-n from the SFT policy for each n, comma-separated; empty = none")
    n_prompts: int = arg(128, "held-out prompts (first sentences of validation stories) every method answers")
    n_samples: int = arg(3, "prompts whose responses from every method are shown side by side")
    no_eos_penalty: float = arg(-1.0, "best-of-n ranks a response that never ended at this reward, as PPO does")
    rlaif_ckpts: str = arg("", "RLAIF policies (PPO on a --feedback constitution RM), comma-separated")
    labeler: str = arg("", "rules | lm: an AI labeller to check against gold; empty: rules if --rlaif_ckpts")
    labeler_dir: str = arg("", "--labeler lm: a checkpoint dir, or gpt2 (HF weights, internet once); empty = --sft_dir")
    constitution: str = arg("data/constitution.md", "the principles the labeller reads")


@dataclass
class StudyConfig(CommonConfig):
    sft_dir: str = arg("", "the SFT checkpoint every run starts from; empty = out_dir/sft, trained if missing")
    rater_bias: str = arg("length,flowery,sycophancy", "the raters' hidden taste, an RM and curve each (none: no bias)")
    rater_bias_weight: float = arg(0.2, "strength of that taste (train_rm.py --rater_bias_weight)")
    iterations: int = arg(60, "PPO iterations per run; rounds splits them into rounds + 1 segments")
    kl_coef: float = arg(0.01, "the weak, fixed KL penalty of overoptimization and rounds")
    betas: str = arg("0.01,0.03,0.1,0.3", "beta_sweep: one PPO run per fixed KL coefficient")
    rounds: int = arg(2, "rounds: extra rounds of fresh preferences on the current policy")
    eval_prompts: int = arg(128, "held-out prompts for every PPO run's final evaluation and each round's measures")
    bon_max: int = arg(64, "overoptimization: best-of-n for n = 1, 2, 4 .. this (a power of 2; 0 = none), "
                            "from this many SFT samples per held-out prompt drawn once")
    bon_prompts: int = arg(64, "overoptimization: held-out prompts best-of-n answers")
    no_eos_penalty: float = arg(-1.0, "best-of-n ranks a response that never ended at this reward, as PPO does")
    ensemble: int = arg(3, "guard: reward models in the ensemble (train_rm.py --ensemble)")
    ensemble_lambda: float = arg(1.0, "guard: lambda of the mean - lambda * std reward")
    parallel: int = arg(1, "training runs at a time (not in rounds); above 1 each runs on one thread (a CPU)")


@dataclass
class FrontierConfig(CommonConfig):
    sft_dir: str = arg("", "the SFT checkpoint every method starts from; empty = out_dir/sft, trained if missing")
    rm_dir: str = arg("", "the reward model every method optimises; empty = out_dir/rm, trained if missing")
    methods: str = arg("ppo,reinforce,rloo,grpo,drgrpo,dpo,bon", "comma-separated methods to run")
    betas: str = arg("0.03,0.1,0.3", "fixed KL coefficients of ppo, reinforce and rloo (KL in the reward)")
    grpo_kl_coefs: str = arg("0.01,0.1,0.3", "KL coefficients of grpo and drgrpo (k3 term in the loss)")
    dpo_betas: str = arg("0.03,0.1,0.3", "DPO betas")
    bon: str = arg("2,4,16", "best-of-n from SFT for each n")
    iterations: int = arg(30, "iterations of every ppo / pg run (the same episodes for each)")
    eval_prompts: int = arg(128, "held-out prompts every method answers")
    select_prompts: int = arg(128, "training prompts on which each method's strength is chosen by gold (0: none)")
    no_eos_penalty: float = arg(-1.0, "best-of-n ranks a response that never ended at this reward, as PPO does")
    parallel: int = arg(1, "training runs at a time; above 1 each gets one thread (a CPU's cores side by side)")


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"):
        return s.lower() in ("1", "true", "yes", "y", "on")
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def default_preset():
    return "gpu" if torch.cuda.is_available() else "cpu"


def parse_config(cls, stage, argv=None, description=None):
    """Build cls from its defaults, the preset and the command line (every field is a --flag)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        comment = f"{f.metadata.get('help', '')} (default {f.default!r}, or the preset's)"
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


def print_config(cfg):
    print(f"{type(cfg).__name__}:")
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k} = {v!r}")
