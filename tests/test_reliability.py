"""Reliability: a checkpoint survives SIGKILL at any moment, a resumed run equals one that never
stopped (bit for bit, every stage), Ctrl-C saves and says how to go on, non-finite steps are
skipped and a diverging run stops with the likely cause, bad inputs get a clear error, and a
checkpoint file cannot run code.

Most script runs here are forked from the test process, which then runs the script with runpy
as `python train_sft.py ...` would: a separate process that SIGKILL and SIGINT really hit, without
paying ~2 s of `import torch` for each of the ~40 runs. The Ctrl-C test of train_sft.py runs the
real command line. Everything runs on CPU in fp32 with one thread (OMP_NUM_THREADS=1).
"""
import ast
import dataclasses
import json
import os
import resource
import pickle
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch._dynamo  # noqa: F401 - see below

import nanorlhf.evaluate  # noqa: F401 - see below
import nanorlhf.metrics  # noqa: F401
from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_checkpoint, load_model, \
    load_resume, save_checkpoint
from nanorlhf.config import PPOConfig, SFTConfig, make_config
from nanorlhf.data import encode_prompts, load_corpus
from nanorlhf.guard import NonFiniteGuard
from nanorlhf.io import atomic_write
from nanorlhf.judge import gold_score
from nanorlhf.optim import optimizer_step
from nanorlhf.prefs import read_prefs
from nanorlhf.runtime import Runtime
from nanorlhf.tokenizer import make_encoding, tokenizer_from_state, tokenizer_state, train_bpe

# The forked runs inherit what this process has loaded, so it loads what the scripts would load
# themselves: matplotlib (~1 s, via metrics), torch._dynamo (imported by the first optimizer, ~2 s)
# and VADER's lexicon (on the gold judge's first call)
gold_score("", "A warm-up sentence.", True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--preset", "tiny", "--device", "cpu", "--dtype", "float32")
SFT_STEPS = 80
SFT_ARGS = (*TINY, "--eval_every", "1", "--max_iters", str(SFT_STEPS), "--sample_every", "1000")
KILLS = 20


# ---------------------------------------------------------------- running scripts

def start(script, *args, log, limit_file_size=None):
    """Run `python script args` in a forked child, stdout and stderr to log; returns its pid.
    limit_file_size: bytes a file may grow to (RLIMIT_FSIZE): a write past it fails as a full disk does."""
    open(log, "w").close()  # exists (and is empty) before the child writes to it
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never returns into pytest
        out = open(log, "a", buffering=1)
        os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
        os.chdir(REPO)
        sys.argv = [script, *map(str, args)]
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:  # what the interpreter does with sys.exit(code) and SystemExit("message")
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def wait(pid, timeout=180):
    """Exit code of the child (minus the signal number when a signal killed it)."""
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} ran longer than {timeout} s")
        time.sleep(0.005)


def run(script, *args, log, **kwargs):
    """Run a script to the end -> (exit code, its output)."""
    code = wait(start(script, *args, log=log, **kwargs))
    with open(log) as f:
        return code, f.read()


def wait_for(log, pattern, pid, timeout=120):
    """Block until a line of the child's output matches pattern; fail if the child ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # peek: the child stays unreaped
        with open(log) as f:
            output = f.read()
        if re.search(pattern, output, re.M):
            return
        assert ended is None, f"the run ended before {pattern!r}:\n{output[-3000:]}"
        time.sleep(0.005)
    raise TimeoutError(pattern)


def interrupt(script, *args, log, after):
    """Start a run, send SIGINT once its output matches `after`, and return (exit code, output)."""
    pid = start(script, *args, log=log)
    wait_for(log, after, pid)
    os.kill(pid, signal.SIGINT)
    code = wait(pid)
    with open(log) as f:
        return code, f.read()


def logged_steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r["step"] for r in records if "loss" in r]  # the training steps (not a final report)


def assert_same_tensors(a, b, what):
    """Bit-identical nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs (max |diff| {(a.float() - b.float()).abs().max():.3g})"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_resumed_equals_straight(resumed_dir, straight_dir, stage, keys):
    resumed, straight = load_checkpoint(resumed_dir, stage), load_checkpoint(straight_dir, stage)
    assert resumed["step"] == straight["step"]
    for key in keys:
        assert_same_tensors(resumed[key], straight[key], key)


# ---------------------------------------------------------------- shared straight runs

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def sft(root):
    """SFT that never stops: the reference of the kill and Ctrl-C tests and the base of the other stages."""
    out = root / "sft"
    code, output = run("train_sft.py", *SFT_ARGS, "--out_dir", out, log=root / "sft.log")
    assert code == 0, output[-3000:]
    return out


@pytest.fixture(scope="module")
def rm(root, sft):
    out = root / "rm"
    code, output = run("train_rm.py", *TINY, "--sft_dir", sft, "--out_dir", out, "--epochs", "6",
                       log=root / "rm.log")
    assert code == 0, output[-3000:]
    return out


# ---------------------------------------------------------------- SIGKILL while checkpointing

def test_sigkill_at_random_points_never_breaks_the_checkpoint_and_resume_is_exact(root, sft):
    """KILLS SIGKILLs of train_sft.py, checkpointing every step; half of them the moment a checkpoint
    write begins. After each, the checkpoint loads; then --resume finishes the run, and its weights,
    Adam moments and logged losses equal those of the run that was never killed."""
    out = root / "killed"
    rng = random.Random(0)
    last_step, mid_write = 0, 0
    for kill in range(KILLS):
        log = root / f"killed{kill}.log"
        pid = start("train_sft.py", *SFT_ARGS, "--out_dir", out, *(["--resume"] if kill else []), log=log)
        wait_for(log, rf"^step {last_step + rng.randint(1, 3)} \|", pid)  # a few steps into this run
        while not os.path.exists(ckpt_path(out)):  # the first run: once it has saved once
            time.sleep(0.0005)
        temp = f"{ckpt_path(out)}.tmp{pid}"  # this run's checkpoint while it is being written
        if kill % 2:  # odd kills: the moment the write of this step's checkpoint begins
            deadline = time.time() + 10
            while not os.path.exists(temp) and time.time() < deadline:
                time.sleep(0.0005)
        else:  # even kills: anywhere in a step
            time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL, f"kill {kill}: the run ended before it was killed"
        mid_write += os.path.exists(temp)  # a write cut short leaves its temp file behind
        ckpt = load_checkpoint(out, "sft")  # always a whole checkpoint: the old one or the new one
        assert last_step <= ckpt["step"] < SFT_STEPS
        last_step = ckpt["step"]
    code, output = run("train_sft.py", *SFT_ARGS, "--out_dir", out, "--resume", log=root / "killed_end.log")
    assert code == 0, output[-3000:]
    assert f"at step {last_step}" in output
    assert mid_write >= KILLS // 4, f"only {mid_write} of {KILLS} kills hit a checkpoint write"
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # the next save removed the dead runs' temp files
    assert_resumed_equals_straight(out, sft, "sft", ["model", "optimizer", "data_rng"])
    assert logged_steps(out) == list(range(1, SFT_STEPS + 1))  # no step lost or logged twice
    losses = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]
    assert losses(out) == losses(sft)
    print(f"{KILLS} kills survived ({mid_write} mid-write), resumed from step {last_step}")


# ---------------------------------------------------------------- Ctrl-C and exact resumption, every stage

def test_ctrl_c_sft_saves_says_how_to_resume_and_resume_is_exact(root, sft):
    """The real command line: SIGINT -> checkpoint, exit 130, a message; --resume then equals the straight run."""
    out = root / "sft_ctrl_c"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train_sft.py", *SFT_ARGS, "--out_dir", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3 |"):
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    step = load_checkpoint(out, "sft")["step"]
    assert 3 <= step < SFT_STEPS
    assert f"stopped at step {step}: saved {ckpt_path(out)}" in output
    assert "--resume" in output.splitlines()[-1] and "Traceback" not in output
    code, output = run("train_sft.py", *SFT_ARGS, "--out_dir", out, "--resume", log=root / "sft_ctrl_c.log")
    assert code == 0 and f"at step {step}" in output
    assert_resumed_equals_straight(out, sft, "sft", ["model", "optimizer", "data_rng"])


def test_ctrl_c_sft_after_the_validation_loss_rose_keeps_the_best_checkpoint(root, sft):
    """SFT's checkpoint is its best validation loss: Ctrl-C on a worse model evaluates it and keeps the best."""
    out = root / "sft_ctrl_c_worse"
    shutil.copytree(sft, out)
    best = load_checkpoint(out, "sft")
    # lr 3 wrecks the weights; no evaluation is due (eval_every 1000), so the stop itself evaluates
    code, output = interrupt("train_sft.py", *SFT_ARGS, "--out_dir", out, "--resume", "--max_iters", "1000",
                             "--eval_every", "1000", "--lr", "3", "--min_lr", "3",
                             log=root / "sft_ctrl_c_worse.log", after=rf"^step {best['step'] + 3} \|")
    assert code == 130, output[-3000:]
    assert f"the checkpoint stays at step {best['step']}" in output and "Traceback" not in output
    assert re.search(rf"stopped at step \d+: {re.escape(str(ckpt_path(out)))} holds step {best['step']}", output)
    kept = load_checkpoint(out, "sft")
    assert kept["step"] == best["step"] and kept["val_loss"] == best["val_loss"]
    assert_same_tensors(kept["model"], best["model"], "model")


def test_rm_interrupted_mid_training_resumes_exactly(root, sft, rm):
    """The RM checkpoints every epoch and on Ctrl-C; an unfinished RM is refused downstream; --resume
    restores the pairs, the split and the sampler, so weights and reward normaliser equal the straight run's."""
    out = root / "rm_ctrl_c"
    args = (*TINY, "--sft_dir", sft, "--out_dir", out, "--epochs", "6")
    code, output = interrupt("train_rm.py", *args, log=root / "rm_ctrl_c.log", after=r"^step 2 \|")
    assert code == 130, output[-3000:]
    ckpt = load_checkpoint(out, "rm")
    assert 2 <= ckpt["step"] < load_checkpoint(rm, "rm")["step"] and "gain" not in ckpt
    with pytest.raises(CheckpointError, match=f"stopped at step {ckpt['step']}.*--resume"):
        load_model(out, "rm", "cpu")  # PPO cannot use a reward model without its normaliser
    code, output = run("train_rm.py", *args, "--resume", log=root / "rm_resume.log")
    assert code == 0, output[-3000:]
    assert_resumed_equals_straight(out, rm, "rm", ["model", "optimizer", "gain", "bias", "val_groups"])


def test_ppo_ctrl_c_then_resume_equals_the_straight_run(root, sft, rm):
    """Policy, value model, both Adam states and the KL controller after Ctrl-C + --resume equal a run
    that never stopped: prompt order, rollout generator and RNGs are all restored."""
    args = (*TINY, "--sft_dir", sft, "--rm_dir", rm, "--iterations", "5", "--save_every", "100")
    code, output = run("train_ppo.py", *args, "--out_dir", root / "ppo", log=root / "ppo.log")
    assert code == 0, output[-3000:]
    out = root / "ppo_ctrl_c"
    code, output = interrupt("train_ppo.py", *args, "--out_dir", out, log=root / "ppo_ctrl_c.log",
                             after=r"^step 1 \|")
    assert code == 130, output[-3000:]
    step = load_checkpoint(out, "ppo")["step"]
    assert 1 <= step < 5 and f"stopped at step {step}: saved {ckpt_path(out)}" in output
    code, output = run("train_ppo.py", *args, "--out_dir", out, "--resume", log=root / "ppo_resume.log")
    assert code == 0 and f"at iteration {step}" in output, output[-3000:]
    assert_resumed_equals_straight(out, root / "ppo", "ppo", ["model", "value_model", "optimizer",
                                                              "value_optimizer", "kl_ctl", "data_rng"])


def test_dpo_ctrl_c_then_resume_equals_the_straight_run(root, sft, rm):
    args = (*TINY, "--sft_dir", sft, "--rm_dir", rm, "--max_iters", "8")
    code, output = run("train_dpo.py", *args, "--out_dir", root / "dpo", log=root / "dpo.log")
    assert code == 0, output[-3000:]
    out = root / "dpo_ctrl_c"
    code, output = interrupt("train_dpo.py", *args, "--out_dir", out, log=root / "dpo_ctrl_c.log",
                             after=r"^step 2 \|")
    assert code == 130, output[-3000:]
    step = load_checkpoint(out, "dpo")["step"]
    assert 2 <= step < 8
    code, output = run("train_dpo.py", *args, "--out_dir", out, "--resume", log=root / "dpo_resume.log")
    assert code == 0 and f"at step {step}" in output, output[-3000:]
    assert_resumed_equals_straight(out, root / "dpo", "dpo", ["model", "optimizer"])
    assert logged_steps(out) == list(range(1, 9))


# ---------------------------------------------------------------- non-finite steps

def test_guard_counts_skipped_steps_and_stops_after_k_in_a_row(capsys):
    guard = NonFiniteGuard(3, "out/sft/ckpt.pt", {"lr": 1e-3}, torch.float32)
    assert guard.check(1, torch.tensor(2.0), True)
    guard.saved(1)
    assert not guard.check(2, float("nan"), False)
    assert not guard.check(3, 1.0, False)  # a finite loss with a non-finite gradient is bad too
    assert guard.check(4, 1.5, True)  # a good step ends the streak
    assert (guard.in_a_row, guard.skipped) == (0, 2)
    assert not guard.can_save(float("nan"))  # a checkpoint with a NaN validation loss is not a good one
    assert not guard.check(5, float("inf"), False) and not guard.check(6, float("nan"), False)
    assert not guard.can_save()
    guard.saved(6)  # ignored: not a good checkpoint
    with pytest.raises(SystemExit) as stop:
        guard.check(7, float("nan"), False)
    message = str(stop.value)
    assert "3 steps in a row" in message and "5 skipped in all" in message
    assert "learning rate is too high" in message and "--lr 0.0001" in message
    assert "out/sft/ckpt.pt (step 1)" in message and "fp16" not in message
    assert "step 5: non-finite loss" in capsys.readouterr().out
    fp16 = NonFiniteGuard(1, "x", {"lr": 1e-3}, torch.float16)
    with pytest.raises(SystemExit, match=r"fp16 overflow[\s\S]*no checkpoint was written"):
        fp16.check(1, float("nan"), False)


def test_optimizer_step_skips_a_nan_gradient():
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    (model(torch.ones(1, 3)).sum() * float("nan")).backward()
    finite, grad_norm = optimizer_step(model, optimizer, rt, grad_clip=1.0)
    assert not finite and grad_norm != grad_norm  # NaN
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_diverging_run_stops_naming_cause_and_keeps_the_last_good_checkpoint(root, sft):
    """Resume a finished SFT run with --lr 1e30: the next update makes the weights overflow, every later
    loss is NaN; after max_bad_steps (5) the run stops, and the checkpoint is still the good one."""
    out = root / "sft_diverged"
    shutil.copytree(sft, out)
    code, output = run("train_sft.py", *SFT_ARGS, "--out_dir", out, "--resume", "--lr", "1e30",
                       "--max_iters", str(SFT_STEPS + 30), log=root / "diverged.log")
    assert code == 1 and "Traceback" not in output
    assert f"resuming with changed settings: max_iters {SFT_STEPS} -> {SFT_STEPS + 30}, lr 0.001 -> 1e+30" \
        in output
    assert "skipped (5 in a row, 5 in all)" in output
    assert re.search(r"stopped at step \d+: 5 steps in a row had a non-finite loss or gradient", output)
    assert "learning rate is too high (lr 1e+30): try --lr 1e+29" in output
    assert f"last good checkpoint is {ckpt_path(out)} (step {SFT_STEPS})" in output
    assert load_checkpoint(out, "sft")["step"] == SFT_STEPS  # no NaN-era checkpoint replaced it


# ---------------------------------------------------------------- damaged, foreign and malicious checkpoints

def test_damaged_checkpoints_are_refused_with_the_fix(root, sft):
    data = open(ckpt_path(sft), "rb").read()
    half = len(data) // 2  # in the middle of the tensor data: torch.load alone would not notice a flipped bit
    damaged = {"truncated to half": data[:half], "truncated to 100 bytes": data[:100], "empty": b"",
               "random bytes": random.Random(0).randbytes(5000), "a text file": b"hello\n" * 20,
               "one flipped bit": data[:half] + bytes([data[half] ^ 1]) + data[half + 1:]}
    for i, (what, content) in enumerate(damaged.items()):
        folder = root / f"damaged{i}"
        folder.mkdir()
        (folder / "ckpt.pt").write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(folder, "sft")
        message = str(err.value)
        assert str(folder) in message and "re-run `python train_sft.py`" in message, (what, message)
    (root / "dir_ckpt" / "ckpt.pt").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(root / "dir_ckpt", "sft")
    save_checkpoint(root / "not_ours", {"weights": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a nanorlhf checkpoint"):
        load_checkpoint(root / "not_ours", "sft")


def test_checkpoint_of_another_stage_or_tokenizer_is_refused(root, sft, rm):
    with pytest.raises(CheckpointError, match="is a 'rm' checkpoint but a 'sft' one is needed"):
        load_model(rm, "sft", "cpu")
    code, output = run("train_dpo.py", *TINY, "--sft_dir", rm, "--out_dir", root / "x", log=root / "stage.log")
    assert code == 1 and "is a 'rm' checkpoint but a 'sft' one is needed" in output and "Traceback" not in output
    # the same reward model, saved with a BPE trained on other text: PPO would read garbage token ids
    other = root / "rm_other_tokenizer"
    ckpt = load_checkpoint(rm, "rm")
    n_vocab = tokenizer_from_state(ckpt["tokenizer"]).n_vocab
    other_text = " ".join(word[::-1] for word in load_corpus("sample")[:60_000].split())
    ckpt["tokenizer"] = tokenizer_state(make_encoding(train_bpe(other_text, n_vocab), "bpe-other"))
    save_checkpoint(other, ckpt)
    with pytest.raises(CheckpointError, match="uses another tokenizer"):
        load_model(other, "rm", "cpu", tokenizer_of=load_checkpoint(sft, "sft"))


def test_checkpoint_of_another_preset_is_refused_naming_it(root, sft, rm):
    """The tiny SFT model (block 96) cannot hold the cpu preset's 32 + 224 tokens: each stage says so first."""
    with pytest.raises(CheckpointError, match=r"\(32 \+ 224\) exceed the block_size 96 .* trained with \(tiny\)"):
        load_model(sft, "sft", "cpu", fits=make_config(PPOConfig, "ppo", preset="cpu"))
    load_model(sft, "sft", "cpu", fits=make_config(PPOConfig, "ppo", preset="tiny"))  # its own preset fits
    for script in ("train_rm.py", "train_ppo.py", "train_dpo.py", "eval.py"):
        rm_dir = () if script == "train_rm.py" else ("--rm_dir", rm)
        code, output = run(script, "--preset", "cpu", "--sft_dir", sft, *rm_dir, "--out_dir", root / "x",
                           log=root / "preset.log")
        assert code == 1 and "trained with (tiny)" in output and "Traceback" not in output, (script, output[-2000:])
    # a missing checkpoint names the flag that pointed at it
    with pytest.raises(CheckpointError, match="point --init_policy at one"):
        load_model(root / "no_policy", "ppo", "cpu", flag="--init_policy")


def test_resume_onto_a_model_of_another_shape_is_refused_naming_the_fix(sft, rm):
    """--resume after changing the model (a shape flag, or an --sft_dir of another width) would fail in
    load_state_dict with pages of size mismatches: the checkpoint check says which setting differs."""
    from nanorlhf.config import RMConfig
    with pytest.raises(CheckpointError, match=r"\(n_embd 32 -> 48\): resume with the model flags it was saved with"):
        load_resume(make_config(SFTConfig, "sft", preset="tiny", out_dir=str(sft), resume=True, n_embd=48), "sft")
    assert load_resume(make_config(SFTConfig, "sft", preset="tiny", out_dir=str(sft), resume=True), "sft")["step"] > 0
    rm_cfg = make_config(RMConfig, "rm", preset="tiny", out_dir=str(rm), resume=True)
    model = load_model(sft, "sft", "cpu")[0]
    assert load_resume(rm_cfg, "rm", model.config)["stage"] == "rm"
    wider = dataclasses.replace(model.config, n_embd=48)
    with pytest.raises(CheckpointError, match=rf"n_embd 32 -> 48\): pass the --sft_dir it was trained from \({re.escape(str(sft))}\)"):
        load_resume(rm_cfg, "rm", wider)


class WritesAMarker:
    """What an attacker would put in a checkpoint: unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused_without_running(root):
    marker = str(root / "pwned")
    zip_dir, raw_dir = root / "evil_zip", root / "evil_raw"
    zip_dir.mkdir(), raw_dir.mkdir()
    torch.save({"stage": "sft", "model": WritesAMarker(marker)}, zip_dir / "ckpt.pt")  # torch's own format
    (raw_dir / "ckpt.pt").write_bytes(pickle.dumps({"stage": "sft", "model": WritesAMarker(marker)}))
    with pytest.raises(CheckpointError, match="refused unread.*Unsupported global.*open"):
        load_checkpoint(zip_dir, "sft")
    with pytest.raises(CheckpointError, match="not a torch zip archive"):
        load_checkpoint(raw_dir, "sft")
    code, output = run("train_rm.py", *TINY, "--sft_dir", zip_dir, "--out_dir", root / "y", log=root / "evil.log")
    assert code == 1 and "refused unread" in output and "Traceback" not in output
    assert not os.path.exists(marker)


def test_every_torch_load_in_the_repo_is_weights_only():
    calls = []  # (file, line, weights_only=True?) of every torch.load(...) call
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", "out")]
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
                    calls.append((os.path.relpath(path, REPO), node.lineno, safe))
    assert any(path == "nanorlhf/checkpoint.py" for path, _, _ in calls), "the search is broken"
    assert all(safe for _, _, safe in calls), [c for c in calls if not c[2]]


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_write(path, lambda f: f.write(b"old"))
    (tmp_path / "ckpt.pt.tmp99999999").write_bytes(b"left by a killed run")  # no such process

    def crash(f):
        f.write(b"half of the new")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # neither our temp file nor the dead run's is left


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_stop_before_training_with_a_clear_message(root, sft):
    empty = root / "empty.txt"
    empty.write_text("\n\n")
    few = root / "few.txt"
    few.write_text("Once upon a time there was a cat.\n\nOnce upon a time there was a dog.\n")
    bad_prefs = root / "bad.jsonl"
    bad_prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    cases = [  # (script, args, exit code, what the message says)
        ("train_sft.py", ("--dataset", empty), 1, "is empty"),
        ("train_sft.py", ("--dataset", few), 1, "only 2 stories"),
        ("train_sft.py", ("--resume",), 1, "nothing to resume"),
        ("train_rm.py", ("--sft_dir", sft, "--prefs", bad_prefs), 1, "line 2: missing key 'rejected'"),
        ("train_ppo.py", ("--rollout_batch", "6", "--n_minibatches", "4"), 2, "must be divisible by n_minibatches"),
        ("train_sft.py", ("--block_size", "32"), 2, "> block_size (32)"),
        ("train_sft.py", ("--eval_every", "0"), 2, "eval_every must be >= 1"),
    ]
    for i, (script, args, expected, message) in enumerate(cases):
        out = root / f"bad{i}"
        code, output = run(script, *TINY, "--out_dir", out, *args, log=root / f"bad{i}.log")
        assert code == expected and message in output and "Traceback" not in output, (script, args, output[-2000:])
        assert not os.path.exists(ckpt_path(out)) and not re.search(r"^step 1 \|", output, re.M)


def test_long_preference_rows_are_cut_to_fit_the_model(root):
    """Prompts and responses longer than the model's block are cut (prompts with a warning), never
    passed on as a sequence the model cannot hold: here block_size = max_prompt_tokens + max_new_tokens.
    The one validation pair is one the gold judge gets wrong (gold accuracy 0): no division by zero."""
    short = (*TINY, "--block_size", "48")
    code, output = run("train_sft.py", *short, "--max_iters", "1", "--out_dir", root / "sft48", log=root / "sft48.log")
    assert code == 0, output[-3000:]
    long_text = "Tom went to the park and played with his ball all day long. " * 12
    prefs = root / "long.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": long_text, "chosen": f"{long_text} {i}", "rejected": "No."}) + "\n"
                             for i in range(6)))
    code, output = run("train_rm.py", *short, "--sft_dir", root / "sft48", "--prefs", prefs, "--out_dir", root / "rm48",
                       "--norm_samples", "4", "--eval_samples", "4", log=root / "rm48.log")
    assert code == 0, output[-3000:]
    assert load_checkpoint(root / "rm48", "rm")["step"] > 0
    assert read_prefs(root / "rm48" / "prefs.jsonl") == read_prefs(prefs)  # beside the RM, for train_dpo.py


def test_config_errors_in_process():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['no_such_key'\]"):
        make_config(SFTConfig, "sft", preset="tiny", no_such_key=1)
    with pytest.raises(ValueError, match="must be divisible"):
        make_config(PPOConfig, "ppo", preset="tiny", rollout_batch=6, n_minibatches=4)
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        make_config(SFTConfig, "sft", preset="tiny", max_bad_steps=0)
    # the RM's raters, refused before any response is sampled for them
    from nanorlhf.config import RMConfig
    with pytest.raises(ValueError, match="unknown rater_bias 'lenght'"):
        make_config(RMConfig, "rm", preset="tiny", rater_bias="lenght")
    with pytest.raises(ValueError, match="n_raters must be >= 2"):
        make_config(RMConfig, "rm", preset="tiny", n_raters=1)
    with pytest.raises(ValueError, match="k_responses must be >= 2"):
        make_config(RMConfig, "rm", preset="tiny", k_responses=1)
    with pytest.raises(ValueError, match="n_prompts must be >= 1"):
        make_config(RMConfig, "rm", preset="tiny", n_prompts=0)
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        make_config(RMConfig, "rm", preset="tiny", val_fraction=1.0)
    with pytest.raises(ValueError, match="max_prompt_tokens and max_new_tokens must be >= 1"):
        make_config(RMConfig, "rm", preset="tiny", max_prompt_tokens=0)
    with pytest.raises(ValueError, match="unknown loss_on 'foo'"):
        make_config(SFTConfig, "sft", preset="tiny", loss_on="foo")
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_config(SFTConfig, "sft", preset="tiny", lr=-1.0)
    with pytest.raises(ValueError, match="norm_samples must be >= 2"):  # one score has no spread: a nan reward
        make_config(RMConfig, "rm", preset="tiny", norm_samples=1)
    make_config(RMConfig, "rm", preset="tiny", prefs="given.jsonl", k_responses=1)  # no raters with --prefs
    with pytest.raises(ValueError, match="unknown compile_mode 'max-autotune': default | max-autotune-no-cudagraphs"):
        make_config(SFTConfig, "sft", preset="tiny", compile_mode="max-autotune")


def test_a_prompt_longer_than_its_budget_is_cut_with_a_warning():
    enc = make_encoding(train_bpe("one two three four five six seven " * 50, 270), "bpe-test")
    prompt = "one two three four five six seven"
    with pytest.warns(UserWarning, match="1 of 2 prompts were longer than max_prompt_tokens=4"):
        cut = encode_prompts(enc, [prompt, "one"], 4)
    assert cut[0] == enc.encode_ordinary(prompt)[-4:] and len(cut[0]) == 4  # the end of the prompt is kept
    assert cut[1] == enc.encode_ordinary("one")
