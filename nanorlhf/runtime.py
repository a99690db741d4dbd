"""The run machinery every train script shares, kept here so that the scripts show the algorithm:
device and precision (decided once), seeds and DDP set-up; training the earlier stages a run needs when
they are missing; resuming; wrapping a model for training (torch.compile, DDP); and the end of every
training step (skipped steps, log, save, stop), one function for all four trainers."""
import contextlib
import dataclasses
import fcntl
import os
import random
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from nanorlhf.assignments import require as require_assignments
from nanorlhf.checks import check_memory
from nanorlhf.checkpoint import NonFiniteWeightsError, ckpt_path, set_rng_state
from nanorlhf.config import CommonConfig
from nanorlhf.distributed import wrap_ddp
from nanorlhf.guard import NonFiniteGuard, StopOnSignal, die_with_parent, run_child
from nanorlhf.metrics import MetricsLog
from nanorlhf.sampler import NonFiniteLogitsError

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


def setup_runtime(cfg, writes=False):
    """Pick device and precision, seed everything, and join DDP when launched by torchrun.
    writes: a training run, which takes its out_dir for itself first (lock_out_dir)."""
    die_with_parent()
    warnings.formatwarning = _plain_warning  # the scripts' warnings (a prompt cut to fit) print as one plain line
    require_assignments(cfg)  # in a student copy: a piece still blanked stops here, before out_dir exists
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
    try:  # before the out_dir is taken: a refused run leaves no folder behind
        check_memory(cfg, device, dtype)
    except ValueError as e:
        raise SystemExit(str(e))
    if writes and rank == 0:
        lock_out_dir(cfg.out_dir)
        drop_stale_next(cfg.out_dir)
    if device.type == "cuda":
        set_cuda_kernels()
    seed_everything(cfg.seed + rank)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Runtime(device=device, dtype=dtype, rank=rank, world_size=world_size, scaler=scaler)


_LOCK = None  # the open out_dir/.lock of this run: the kernel drops the lock when the process ends, even on SIGKILL


def lock_out_dir(out_dir):
    """Take out_dir for this run before anything in it is read or written: a second run on the same folder
    would interleave its metrics and checkpoints with this one's. Creating the lock file is also the check
    that out_dir can be written at all, before any data or model work."""
    global _LOCK
    path = os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise SystemExit(f"cannot write to --out_dir {out_dir} ({e.strerror}): pass a folder this user can "
                         f"write") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"another run (pid {pid}) is writing {out_dir}: wait for it, or pass another --out_dir") \
            from None
    f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
    _LOCK = f


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
        # Ctrl-C and SIGTERM reach the child (it saves its checkpoint and stops), and this run waits for it
        returncode = run_child(command)
        if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # its StopOnSignal saved and stopped it
            print(f"{script} was stopped and saved its checkpoint; finish it with\n  {shown} --resume\n"
                  f"then run this command again", file=sys.stderr, flush=True)
            sys.exit(returncode)
        if returncode < 0:  # killed by a signal before its training loop: nothing of it to resume
            print(f"{script} was stopped ({signal.Signals(-returncode).name}) before it saved a checkpoint; "
                  f"run this command again", file=sys.stderr, flush=True)
            sys.exit(128 - returncode)
        if returncode != 0:
            raise SystemExit(f"{script} failed; fix that stage first")


def next_path(path):
    """Where a new (not resumed) run writes a file its folder already holds, such as prefs.jsonl: path.next,
    put in place by the run's first checkpoint (save_step), so that a run that fails before it leaves the
    folder's old files as they were, consistent with its old checkpoint."""
    return path + ".next"


def pending_files(out_dir):
    return [os.path.join(out_dir, name[:-len(".next")]) for name in sorted(os.listdir(out_dir))
            if name.endswith(".next")] if os.path.isdir(out_dir) else []


def drop_stale_next(out_dir):
    """A .next file of an earlier run that stopped before its first checkpoint: not this run's data."""
    for path in pending_files(out_dir):
        os.remove(next_path(path))


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
    """Write a checkpoint (rank 0; save(step) builds and writes it) and note it as the last good one. Every
    save of every trainer comes here: a checkpoint is written only after a good step and with finite weights,
    and a write that fails (a full disk) stops the run saying what the old checkpoint still holds.
    -> True (the run goes on); a save that must not happen exits with a message instead."""
    if not run.guard.can_save():
        raise SystemExit(run.guard.failed(step))
    if run.rt.is_main:
        try:
            save(step)
        except NonFiniteWeightsError as e:
            raise SystemExit(run.guard.failed(step, f"step {step} left non-finite weights ({e})")) from None
        except OSError as e:
            raise SystemExit(f"could not write {run.path} ({e.strerror or e}; disk full?): free space or pass another "
                             f"--out_dir; {run.guard.still_holds()}") from None
        for path in pending_files(os.path.dirname(run.path)):  # a new run's files, consistent with it now
            os.replace(next_path(path), path)
            if run.log.path == next_path(path):
                run.log.path = path
    run.guard.saved(step)
    return True


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
        if stop_save and run.guard.can_save(*finite):
            save_step(run, save, step)
        elif run.guard.saved_step is None and not stop_save:  # nothing good to keep yet
            raise SystemExit(f"stopped at step {step} without a checkpoint: no good step to save yet")
        elif run.rt.is_main:
            where = (f"the checkpoint stays at step {run.guard.saved_step}" if run.guard.saved_step is not None
                     else run.guard.still_holds())
            print(f"step {step} is not saved (no better than the checkpoint, or a bad step): {where}", flush=True)
        run.stop.exit(run.path, step, step if run.guard.saved_step == step else run.guard.saved_step)
    if save_due and run.guard.can_save(*finite):
        save_step(run, save, step)


def guarded_sample(run, step, sample):
    """Samples or an evaluation printed during training: skipped while the last step was bad, and logits
    that turn non-finite count as a bad step of the guard (a message, not a traceback from the sampler)."""
    if not run.guard.can_save():
        return None
    try:
        return sample()
    except NonFiniteLogitsError:
        run.guard.check(step, float("nan"), False, what="logits while sampling")
        return None


@contextlib.contextmanager
def stop_if_diverged(run, step):
    """Sampling that the training needs (PPO's rollouts): logits that turn non-finite mean weights that
    diverged, which no skipped step can mend: the run stops as the guard stops it, not with a traceback."""
    try:
        yield
    except NonFiniteLogitsError:
        raise SystemExit(run.guard.failed(step, "the policy's weights diverged (non-finite logits while "
                                                "sampling)")) from None


def end_loop(run):
    """After the last step: Ctrl-C and SIGTERM back to their handlers; under DDP every rank waits here.
    A run whose last step was bad, or that made no good step at all, is a failure: it exits non-zero."""
    run.stop.release()
    if not run.guard.can_save() or (run.guard.steps and not run.guard.good):
        raise SystemExit(run.guard.failed(run.guard.last_step))
