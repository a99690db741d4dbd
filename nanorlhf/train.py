"""The training step every stage shares: AdamW parameter groups, a clipped (and on
fp16, loss-scaled) optimizer step that skips non-finite gradients, a guard that stops a run
whose steps keep failing, a clean stop on Ctrl-C, DDP wrapping and metric averaging across ranks."""
import math
import os
import shlex
import signal
import sys

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def make_optimizer(model, lr, weight_decay, device, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only (not biases, LayerNorms). Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def backward(loss, rt):
    (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()


def optimizer_step(model, optimizer, rt, grad_clip, update_scaler=True):
    """Clip the gradient norm and step. A non-finite gradient skips the step (the
    gradients are dropped) and returns False with the norm, so callers can count it.
    Two optimizers on one loss (PPO's policy and value) step the first with update_scaler=False:
    fp16's GradScaler must unscale both with the scale the loss was multiplied by, then update once."""
    if rt.scaler is not None:
        rt.scaler.unscale_(optimizer)  # the fp32 master gradients, divided by the loss scale
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = bool(torch.isfinite(grad_norm))
    if rt.scaler is not None:
        rt.scaler.step(optimizer)  # the scaler skips non-finite steps itself and lowers its scale
        if update_scaler:
            rt.scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, float(grad_norm)


def resume_command(*extra):
    """The command line of this run with --resume (and extra flags) added: how to continue it
    (under torchrun, with torchrun: each rank's share of the sampling depends on the process count)."""
    argv = sys.argv + ([] if "--resume" in sys.argv else ["--resume"])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    launcher = ["torchrun", "--nproc_per_node", str(world_size)] if world_size > 1 else ["python"]
    return shlex.join([*launcher, *argv, *extra])


class NonFiniteGuard:
    """Counts the steps skipped for a non-finite loss or gradient norm (optimizer_step skips
    them) and stops the run after max_bad_steps in a row, naming the likely cause and the
    last good checkpoint: skipping cannot fix a run that keeps producing NaN or inf."""

    def __init__(self, max_bad_steps, ckpt_path, lrs, dtype):
        self.max_bad_steps = max_bad_steps
        self.ckpt_path = ckpt_path
        self.lrs = lrs  # {"lr": 1e-3, ...}: the learning-rate flags of this stage
        self.dtype = dtype
        self.in_a_row = 0  # bad steps since the last good one
        self.skipped = 0  # bad steps in all
        self.saved_step = None  # the step of the last checkpoint written while the steps were good

    def check(self, step, loss, grads_finite, scaler=None):
        """-> True if the step was good. loss: the step's loss; grads_finite: from optimizer_step."""
        loss = float(loss)
        if math.isfinite(loss) and grads_finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        if scaler is not None and scaler.is_enabled() and math.isfinite(loss) and scaler.get_scale() >= 1.0:
            return False  # an fp16 gradient overflow: the GradScaler lowered its scale, as it is meant to
        self.in_a_row += 1
        print(f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} (loss {loss}), "
              f"step skipped ({self.in_a_row} in a row, {self.skipped} in all)", flush=True)
        if self.in_a_row >= self.max_bad_steps:
            raise SystemExit(self.message(step))
        return False

    def can_save(self, *values):
        """No bad step since the last good one and the given values (a validation loss) finite:
        a checkpoint written now is a good one, so it may replace the last good one."""
        return self.in_a_row == 0 and all(math.isfinite(v) for v in values)

    def saved(self, step):
        if self.in_a_row == 0:
            self.saved_step = step

    def message(self, step):
        lower = [a for k, v in self.lrs.items() for a in (f"--{k}", f"{v / 10:g}")]
        causes = [f"the learning rate is too high ({', '.join(f'{k} {v:g}' for k, v in self.lrs.items())}): "
                  f"try {' '.join(lower)} (10x lower) or a longer warmup",
                  "bad data: a batch of empty, extreme or corrupt examples (check --dataset / --prefs)"]
        if self.dtype == torch.float16:
            causes.insert(0, "fp16 overflow (dtype float16): try --dtype bfloat16, or --dtype float32")
        if self.saved_step is None:
            where = f"no checkpoint was written before these steps: start again with {' '.join(lower)}"
        else:
            where = (f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step}); continue from it "
                     f"with: {resume_command(*lower)}")
        return (f"stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"({self.skipped} skipped in all). Likely causes:\n  * " + "\n  * ".join(causes) + f"\n{where}")


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (`kill`, a cluster's pre-emption) during training: the loop
    finishes its step, saves a checkpoint and exits with 128 + the signal number, saying how to
    resume. A second Ctrl-C stops at once; the last checkpoint is intact either way (atomic writes)."""

    def __init__(self):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.release()
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: the signal may arrive in the middle of a print, and print is not reentrant
        os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                    f"(Ctrl-C again stops at once, without saving)\n".encode())

    def requested(self, rt):
        """True on every rank once any rank got the signal, so that all stop after the same step."""
        if rt.world_size > 1:
            flag = torch.tensor([float(self.signum or 0)], device=rt.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None

    def release(self):
        """After the loop: give the signals back to their previous handlers and, under DDP, wait
        until every rank has left the loop (a rank that tore the process group down while another
        was still finishing the last step's stop-flag all_reduce aborted in gloo, 3 runs in 8)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def exit(self, path, step, saved_step=None):
        """saved_step: the step the checkpoint at path holds, when that is not this one (SFT keeps its best)."""
        if int(os.environ.get("RANK", 0)) == 0:  # every rank stops here; one of them says so
            if saved_step is None or saved_step == step:
                print(f"stopped at step {step}: saved {path}\nto continue exactly where it stopped: "
                      f"{resume_command()}", flush=True)
            else:
                print(f"stopped at step {step}: {path} holds step {saved_step}\nto continue from there: "
                      f"{resume_command()}", flush=True)
        finish_ddp()
        sys.exit(128 + self.signum)


def finish_ddp():
    """The end of a run under torchrun, every way out (done, or stopped by Ctrl-C): tear the process
    group down. A process that exits with it still up can abort in gloo's threads ("terminate called
    without an active exception", pytorch#190489). No barrier first: rank 0 may still evaluate for
    minutes after the loop, longer than NCCL waits at a barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_ddp(model, rt):
    if rt.world_size == 1:
        return model
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


def all_reduce_mean(x, rt):
    """Mean of a scalar tensor over ranks (itself on one process)."""
    if rt.world_size == 1:
        return x
    x = x.detach().to(rt.device, torch.float32, copy=True)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(x)
    return x / rt.world_size


def all_reduce_max(x, rt):
    """Largest value of a scalar tensor over ranks (itself on one process)."""
    if rt.world_size == 1:
        return x
    x = x.detach().to(rt.device, torch.float32, copy=True)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


# A mean over a global batch split across ranks: rank r holds the sum S_r over its n_r tokens (or
# pairs). DDP averages the ranks' gradients, so each rank divides S_r by (n_1 + ... + n_W) / W:
#   mean_r [ S_r / (sum_r n_r / W) ] = sum_r S_r / sum_r n_r     the mean over the whole batch,
# where S_r / n_r on each rank would give the mean of the ranks' means instead.
def global_mean_denominator(count, rt):
    """(sum over ranks of count) / world_size; count a 0-dim tensor (tokens, or pair weights), the
    count itself on one process. all_reduce_mean of the rank losses divided by it is the global mean.
    A count of 0 (nothing to average) divides by a tiny number instead: a sum of 0 stays 0."""
    count = count.detach().float()
    if rt.world_size > 1:
        count = count.clone()
        torch.distributed.all_reduce(count)
    return count.clamp(min=1e-8) / rt.world_size


def epoch_batch(n_rows, batch_size, step, seed, rt):
    """This rank's row indices at a step: every epoch shuffles the rows (seed + epoch: the same order
    on every rank) and cuts them into batches of batch_size, and rank r takes rows r, r + W, ... of the
    step's batch. A last batch with fewer rows than ranks is topped up from the epoch's start."""
    epoch, i = divmod(step, math.ceil(n_rows / batch_size))
    order = np.random.default_rng(seed + epoch).permutation(n_rows)
    batch = order[i * batch_size:(i + 1) * batch_size]
    if len(batch) < rt.world_size:  # every rank needs a row: DDP steps only when all of them do
        batch = np.concatenate([batch, order[:rt.world_size - len(batch)]])
    return batch[rt.rank::rt.world_size]


def all_gather_lists(items, rt):
    """Every rank's python list, concatenated in rank order (the list itself on one process)."""
    if rt.world_size == 1:
        return items
    parts = [None] * rt.world_size
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]
