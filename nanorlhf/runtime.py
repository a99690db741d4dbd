"""The run machinery every train script shares, kept here so that the scripts show the algorithm:
device and precision (decided once), seeds and DDP set-up; training the earlier stages a run needs when
they are missing; resuming; wrapping a model for training (torch.compile, DDP); and the end of every
training step (skipped steps, log, save, stop), one function for all four trainers."""
import contextlib
import dataclasses
import os
import random
import shlex
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from nanorlhf.checkpoint import ckpt_path, set_rng_state
from nanorlhf.config import CommonConfig
from nanorlhf.distributed import wrap_ddp
from nanorlhf.guard import NonFiniteGuard, StopOnSignal
from nanorlhf.metrics import MetricsLog

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the train_*.py scripts are


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
    dtype = DTYPES.get(cfg.dtype)
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


# ---------------------------------------------------------------- earlier stages, trained when missing
def train_missing_stages(cfg, rt, stages=("sft", "rm")):
    """Run train_sft.py / train_rm.py for each stage of `stages` whose checkpoint (cfg.<stage>_dir) is
    missing, with this run's shared settings, before this stage starts. Under torchrun it says the command."""
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig)
              if f.name not in ("out_dir", "resume")}
    for stage in stages:
        script, out_dir = f"train_{stage}.py", getattr(cfg, f"{stage}_dir")
        extra = ["--sft_dir", cfg.sft_dir] if stage == "rm" else []
        if os.path.exists(ckpt_path(out_dir)):
            continue
        if rt.world_size > 1:
            # not inside a torchrun job: the child would join this job's rendezvous, and the other ranks
            # would wait for the whole stage at a barrier (NCCL gives up after 10 minutes)
            command = shlex.join(["torchrun", "--nproc_per_node", str(rt.world_size), script, "--preset",
                                  cfg.preset, "--out_dir", out_dir, *extra])
            raise SystemExit(f"no {stage} checkpoint at {ckpt_path(out_dir)}: train it first:\n  {command}"
                             if rt.is_main else 1)  # the message once, from rank 0
        # the script beside nanorlhf/, run in this directory: relative paths (out_dir, dataset) mean the same there
        path = os.path.relpath(os.path.join(REPO, script))
        command = [sys.executable, path, "--out_dir", out_dir, *extra,
                   *[a for k, v in common.items() for a in (f"--{k}", str(v))]]
        shown = shlex.join(["python", *command[1:]])
        print(f"no {stage} checkpoint at {ckpt_path(out_dir)}: training it first with the same settings:\n  {shown}",
              flush=True)
        # Ctrl-C belongs to the child meanwhile: it saves its checkpoint and stops (a Python handler,
        # unlike SIG_IGN, is not inherited, so the child gets its own)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        returncode = subprocess.run(command).returncode
        signal.signal(signal.SIGINT, previous)
        if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise SystemExit(f"{script} was stopped and saved its checkpoint; finish it with\n  "
                             f"{shown} --resume\nthen run this command again")
        if returncode != 0:
            raise SystemExit(f"{script} failed; fix that stage first")


# ---------------------------------------------------------------- resume, and the modules that train
def make_guard(cfg, rt, lrs):
    """The NonFiniteGuard of a run; lrs: its learning-rate flags ({"lr": cfg.lr, ...}), named in its advice."""
    return NonFiniteGuard(cfg.max_bad_steps, ckpt_path(cfg.out_dir), lrs, rt.dtype)


def restore(ckpt, rt, guard, parts, generator=None, unit="step"):
    """Continue from a --resume checkpoint: parts {"model": model, "optimizer": optimizer, ...} load the
    state dicts stored under those keys; then the fp16 loss scale, every RNG (and the generator) -> step."""
    for key, part in parts.items():
        part.load_state_dict(ckpt[key])
    if rt.scaler is not None and ckpt.get("scaler"):  # fp16: the loss scale it had reached
        rt.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], generator)
    guard.saved(ckpt["step"])
    if rt.is_main:
        print(f"resumed from {guard.ckpt_path} at {unit} {ckpt['step']}")
    return ckpt["step"]


def for_training(model, cfg, rt):
    """The module the training steps call: torch.compile'd with --compile, wrapped for DDP under torchrun.
    It shares its fp32 weights with `model`, which sampling and saving use."""
    return wrap_ddp(torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model, rt)


# ---------------------------------------------------------------- the end of every training step
@dataclass
class Run:
    """What the end of a step needs: the runtime, the guard, the metrics log, the stop flag, the checkpoint."""
    rt: Runtime
    guard: NonFiniteGuard
    log: MetricsLog
    stop: StopOnSignal
    path: str


def start_loop(cfg, rt, guard, start, resumed):
    """Open the metrics log (a resumed run drops records past its checkpoint's step) and catch Ctrl-C."""
    log = MetricsLog(cfg.out_dir, resume=cfg.resume, enabled=rt.is_main)
    if resumed:
        log.keep_until(start)  # records a killed run logged after its last checkpoint are logged again
    return Run(rt, guard, log, StopOnSignal(), ckpt_path(cfg.out_dir))


def save_step(run, save, step):
    """Write a checkpoint (rank 0; save(step) builds and writes it) and note it as the last good one."""
    if run.rt.is_main:
        save(step)
    run.guard.saved(step)


def end_step(run, step, metrics, save, log_due, save_due=False, finite=(), stop_save=True):
    """The end of a training step, the same for every trainer: count skipped steps, log, save when due, and on
    Ctrl-C or SIGTERM save and exit saying how to resume. A due save needs a good step and `finite` values
    (a validation loss): a good checkpoint is never replaced by a bad one. stop_save False: a stop keeps
    the checkpoint there is (SFT keeps its best fit)."""
    if run.guard.skipped:
        metrics["skipped_steps"] = run.guard.skipped
    stopping = run.stop.requested(run.rt)
    if log_due or stopping:
        run.log.log(step, **metrics)
    if stopping:
        if stop_save:
            save_step(run, save, step)
        elif run.guard.saved_step is None:  # nothing good to keep yet
            raise SystemExit(f"stopped at step {step} without a checkpoint: no good step to save yet")
        elif run.rt.is_main:
            print(f"step {step} is not saved (no better than the checkpoint, or a bad step): the checkpoint stays "
                  f"at step {run.guard.saved_step}", flush=True)
        run.stop.exit(run.path, step, step if stop_save else run.guard.saved_step)
    if save_due and run.guard.can_save(*finite):
        save_step(run, save, step)


def end_loop(run):
    """After the last step: Ctrl-C and SIGTERM back to their handlers; under DDP every rank waits here."""
    run.stop.release()
