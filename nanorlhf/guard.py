"""Two ways a run stops early, each with a message that says how to go on: NonFiniteGuard (steps that
keep producing NaN or inf) and StopOnSignal (Ctrl-C or SIGTERM: finish the step, save, exit). And a stage
run as a child process (run_child) gets those signals passed on, and stops if its parent dies."""
import ctypes
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import torch

from nanorlhf.distributed import finish_ddp


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
        self.steps = self.good = 0  # steps this run checked, and the good ones among them
        self.last_step = None

    def check(self, step, loss, grads_finite, scaler=None, what=None):
        """-> True if the step was good. loss: the step's loss; grads_finite: from optimizer_step.
        what: what else was non-finite (sampling's logits), counted as a bad step too."""
        loss = float(loss)
        if what is None:
            self.steps += 1
        self.last_step = step
        if math.isfinite(loss) and grads_finite:
            self.in_a_row = 0
            self.good += 1
            return True
        if what is not None:
            self.good -= 1  # the step checked good before its weights gave non-finite logits
        self.skipped += 1
        if scaler is not None and scaler.is_enabled() and math.isfinite(loss) and scaler.get_scale() >= 1.0:
            self.good += 1  # not a failure: the run goes on as it should
            return False  # an fp16 gradient overflow: the GradScaler lowered its scale, as it is meant to
        self.in_a_row += 1
        what = what or ("loss" if not math.isfinite(loss) else "gradient")
        print(f"step {step}: non-finite {what} (loss {loss}), "
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

    def still_holds(self):
        """What the checkpoint file holds now, for the message of a run that stops without saving."""
        if self.saved_step is not None:
            return f"{self.ckpt_path} still holds step {self.saved_step}"
        if os.path.exists(self.ckpt_path):
            return f"{self.ckpt_path} was not replaced (it holds what it held before this run)"
        return f"no checkpoint was written to {self.ckpt_path}"

    def failed(self, step, reason=None):
        """The message of a run that ends on bad steps (or with no good step at all): a failure, exit 1."""
        bad = reason or (f"{self.in_a_row} step(s) in a row had a non-finite loss or gradient" if self.in_a_row else
                         f"none of its {self.steps} steps had a finite loss and gradient")
        return f"stopped at step {step}: {bad}, so this run is not saved. Likely causes:\n" + \
            self.message(step).split("\n", 1)[1]

    def message(self, step):
        lower = [a for k, v in self.lrs.items() for a in (f"--{k}", f"{v / 10:g}")]
        causes = [f"the learning rate is too high ({', '.join(f'{k} {v:g}' for k, v in self.lrs.items())}): "
                  f"try {' '.join(lower)} (10x lower) or a longer warmup",
                  "bad data: a batch of empty, extreme or corrupt examples (check --dataset / --prefs)"]
        if self.dtype == torch.float16:
            causes.insert(0, "fp16 overflow (dtype float16): try --dtype bfloat16, or --dtype float32")
        if self.saved_step is None:
            where = (f"no checkpoint was written before these steps ({self.still_holds()}): start again with "
                     f"{' '.join(lower)}")
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
        """saved_step: the step the checkpoint at path holds (this one: saved now; another: SFT keeps its best,
        or a bad step was not saved; None: this run saved nothing)."""
        if int(os.environ.get("RANK", 0)) == 0:  # every rank stops here; one of them says so
            if saved_step == step:
                print(f"stopped at step {step}: saved {path}\nto continue exactly where it stopped: "
                      f"{resume_command()}", flush=True)
            elif saved_step is None:
                print(f"stopped at step {step}: this run saved no checkpoint ({path} "
                      f"{'is as it was before' if os.path.exists(path) else 'does not exist'}); start it again",
                      flush=True)
            else:
                print(f"stopped at step {step}: {path} holds step {saved_step}\nto continue from there: "
                      f"{resume_command()}", flush=True)
        finish_ddp()
        sys.exit(128 + self.signum)


def run_child(command, **kwargs):
    """subprocess.run for a stage trained as a child process: SIGINT, SIGTERM and SIGHUP sent to this
    process are passed on to the child, and this process waits for it, so that no stage goes on writing
    after the command that started it has ended. -> the child's exit code."""
    # its own process group: a Ctrl-C at the terminal reaches this process alone, which passes it on once
    # (twice would be the child's "Ctrl-C again stops at once, without saving")
    child = subprocess.Popen(command, process_group=0, env={**(kwargs.pop("env", None) or os.environ), PARENT_ENV: str(os.getpid())}, **kwargs)
    forward = lambda signum, frame: child.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return child.wait()  # a signal runs `forward`, then the wait goes on
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_children(commands, logs, parallel, env=None, on_exit=None):
    """run_child for several commands, at most `parallel` at a time, each writing to its open log file:
    SIGINT, SIGTERM and SIGHUP reach every running child, and after one no new child starts. on_exit(i, code,
    wall_s), where given, is called as soon as child i exits, so that what it finished is recorded even if the
    batch is stopped later. -> [(exit code, wall-clock seconds)] in the order of commands; (None, 0.0) for one
    never started."""
    env = {**(env or os.environ), PARENT_ENV: str(os.getpid())}
    pending, running, done, stop = list(range(len(commands))), {}, [(None, 0.0)] * len(commands), []

    def forward(signum, frame):
        stop.append(signum)
        for child, _ in running.values():
            child.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while running or (pending and not stop):
            while pending and len(running) < parallel and not stop:
                i = pending.pop(0)
                running[i] = (subprocess.Popen(commands[i], process_group=0, env=env, stdout=logs[i],
                                               stderr=subprocess.STDOUT), time.time())
            for i, (child, t0) in list(running.items()):
                if child.poll() is not None:
                    done[i] = (child.returncode, time.time() - t0)
                    del running[i]
                    if on_exit is not None:
                        on_exit(i, *done[i])
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return done


PARENT_ENV = "NANORLHF_PARENT_PID"  # run_child tells the child stage who started it


def die_with_parent():
    """In a stage started by run_child (setup_runtime calls this first): on Linux, ask the kernel to send this
    process SIGTERM when that parent dies, even by SIGKILL, where no handler of the parent can pass a signal on
    (prctl PR_SET_PDEATHSIG); if the parent is already gone, stop now. The stage then stops as on any SIGTERM."""
    parent = os.environ.pop(PARENT_ENV, None)  # popped: this stage's own children get their own
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)
