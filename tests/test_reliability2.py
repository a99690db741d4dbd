"""Issue 17: a failed run never looks like a success. One section per class of failure the issue
names (1-9); each test drives the scripts as a user would (command line in, exit code, output and
files on disk out) or calls the library function whose behaviour the class is about, so that the
tests hold whatever the training code looks like inside.

The mechanisms these tests hold are in nanorlhf/runtime.py (every save, the end of the loop, the out_dir
lock, child stages), nanorlhf/guard.py and nanorlhf/checkpoint.py, shared by the four trainers. The scripts
run forked from this process with runpy, as in test_reliability.py: a real separate process for signals
and exit codes, without paying `import torch` for each run.
"""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanorlhf.checkpoint import ckpt_path, load_checkpoint, save_checkpoint
from nanorlhf.config import DPOConfig, EvalConfig, PPOConfig, RMConfig, SFTConfig, StudyConfig, make_config
from nanorlhf.data import download
from nanorlhf.sampler import generate, naive_generate, sample_token
from test_data import CORPUS, RangeServer
from test_reliability import REPO, TINY, run, start, wait, wait_for  # the forked runs, and their warm-up

from conftest import left_padded, make_gpt


def alive(pid):
    """Running (a zombie, ended but not reaped, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def read(path):
    with open(path, "rb") as f:
        return f.read()


def claimed_saves(output):
    """The files a run said it saved ("saved out/x/ckpt.pt, ..." names the folder's ckpt.pt first)."""
    return re.findall(r"saved (\S+?ckpt\.pt)", output)


# ---------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability2")


@pytest.fixture(scope="module")
def sft(root):
    out = root / "sft"
    code, output = run("train_sft.py", *TINY, "--out_dir", out, log=root / "sft.log")
    assert code == 0, output[-3000:]
    return out


@pytest.fixture(scope="module")
def rm(root, sft):
    out = root / "rm"
    code, output = run("train_rm.py", *TINY, "--sft_dir", sft, "--out_dir", out, log=root / "rm.log")
    assert code == 0, output[-3000:]
    return out


def prefs_with(rm, path, n=None, **changes):
    """The RM's preference pairs (the first n) with some fields changed, written to path."""
    rows = [json.loads(line) for line in open(rm / "prefs.jsonl")][:n]
    path.write_text("".join(json.dumps({**r, **changes}) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- 1. a guarded run overwrites a good model

def test_1_a_diverging_rm_run_does_not_replace_the_finished_rm_in_its_folder(root, sft, rm):
    """--lr 1e30: step 1 is finite, every later step is skipped as non-finite (fewer than max_bad_steps),
    and the final save must not replace the good RM with the broken one; the run fails."""
    out = root / "rm_lr_1e30"
    shutil.copytree(rm, out)
    before = read(ckpt_path(out))
    code, output = run("train_rm.py", *TINY, "--sft_dir", sft, "--out_dir", out, "--lr", "1e30",
                       log=root / "rm_lr_1e30.log")
    assert code != 0, output[-3000:]
    assert read(ckpt_path(out)) == before
    assert "Traceback" not in output and str(ckpt_path(out)) in output.splitlines()[-1]  # says what is still good


def test_1_a_diverging_dpo_run_leaves_the_finished_dpo_folder_as_it_was(root, sft, rm, dpo):
    """The same class through another trainer, and the folder's log too: a new DPO run (--lr 1e30) in a
    finished DPO folder fails, and its checkpoint and metrics.jsonl stay the old run's (a new log takes the
    old one's place only at the new run's first checkpoint)."""
    out = root / "dpo_lr_1e30"
    shutil.copytree(dpo, out)
    before = {name: read(out / name) for name in ("ckpt.pt", "metrics.jsonl")}
    code, output = run("train_dpo.py", *TINY, "--sft_dir", sft, "--rm_dir", rm, "--out_dir", out, "--lr", "1e30",
                       log=root / "dpo_lr_1e30.log")
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert {name: read(out / name) for name in before} == before
    assert str(ckpt_path(out)) in output.splitlines()[-1] and not claimed_saves(output)
    # the failed run's own log is beside it, to read; the next run in this folder drops it
    assert json.loads(open(out / "metrics.jsonl.next").readline())["step"] == 1


def test_1_no_save_passes_a_bad_step_or_non_finite_weights(tmp_path):
    """runtime.save_step, which every save of every trainer goes through: after a bad step, or with nan
    weights, nothing is written and the run stops (exit 1) saying what the checkpoint file still holds."""
    from types import SimpleNamespace
    from nanorlhf.runtime import Runtime, make_guard, save_step, start_loop
    cfg = SimpleNamespace(out_dir=str(tmp_path), resume=False, max_bad_steps=10)
    rt = Runtime(torch.device("cpu"), torch.float32)
    guard = make_guard(cfg, rt, {"lr": 1.0})
    run_ = start_loop(cfg, rt, guard, 0, resumed=False)
    run_.stop.release()
    nan_model = lambda step: save_checkpoint(tmp_path, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    with pytest.raises(SystemExit, match=rf"non-finite weights.*\n(.*\n)*.*no checkpoint was written to "
                                         rf"{re.escape(str(ckpt_path(tmp_path)))}"):
        save_step(run_, nan_model, 1)
    assert guard.check(1, float("nan"), True) is False
    with pytest.raises(SystemExit, match="1 step.* in a row had a non-finite"):
        save_step(run_, lambda step: pytest.fail("saved after a bad step"), 1)
    assert not os.path.exists(ckpt_path(tmp_path))


@pytest.mark.parametrize("earlier", [None, 3])
def test_1_sigterm_after_a_bad_step_saves_nothing_and_says_what_the_file_holds(tmp_path, capsys, earlier):
    """The save on SIGTERM passes the guard too: after a bad step it is not made, and the message says so
    (no "saved" line), naming the step the checkpoint holds when this run saved one earlier."""
    from types import SimpleNamespace
    from nanorlhf.runtime import Runtime, end_step, make_guard, start_loop
    cfg = SimpleNamespace(out_dir=str(tmp_path), resume=False, max_bad_steps=10)
    rt = Runtime(torch.device("cpu"), torch.float32)
    guard = make_guard(cfg, rt, {"lr": 1.0})
    run_ = start_loop(cfg, rt, guard, 0, resumed=False)
    if earlier:
        guard.saved(earlier)
    guard.check(5, float("nan"), True)
    run_.stop.signum = signal.SIGTERM
    try:
        with pytest.raises(SystemExit) as stopped:
            end_step(run_, 5, {"loss": float("nan")}, lambda step: pytest.fail("saved a bad step"), log_due=True)
    finally:
        run_.stop.release()  # the test process's own Ctrl-C back
    assert stopped.value.code == 128 + signal.SIGTERM
    output = capsys.readouterr().out
    assert not claimed_saves(output) and not os.path.exists(ckpt_path(tmp_path)), output
    assert (f"the checkpoint stays at step {earlier}" if earlier else "this run saved no checkpoint") in output


# ---------------------------------------------------------------- 2. "saved ckpt.pt" with no ckpt.pt

@pytest.mark.parametrize("script", ["train_dpo.py", "train_rm.py"])
def test_2_a_run_without_a_finite_step_fails_and_claims_no_save(root, sft, rm, script, tmp_path):
    """Weights of 1e308 (valid numbers, accepted by the preference file's check) make every loss inf:
    no step is finite, so there is nothing to save and the run is a failure."""
    prefs = prefs_with(rm, tmp_path / "huge_weights.jsonl", weight=1e308)
    out = tmp_path / "out"
    rm_dir = ("--rm_dir", rm) if script == "train_dpo.py" else ()
    code, output = run(script, *TINY, "--sft_dir", sft, *rm_dir, "--prefs", prefs, "--out_dir", out,
                       log=tmp_path / "run.log")
    for saved in claimed_saves(output):
        assert os.path.exists(saved), f"claims to have saved {saved}:\n{output[-2000:]}"
    assert code != 0, output[-3000:]
    assert "Traceback" not in output


def test_2_a_run_with_no_good_step_fails_below_max_bad_steps(tmp_path):
    """runtime.end_loop: a run whose steps were all bad (here one, with max_bad_steps 10, so the guard never
    stopped it) exits 1 after its loop, naming the checkpoint, instead of going on to a "saved" line."""
    from types import SimpleNamespace
    from nanorlhf.runtime import Runtime, end_loop, end_step, make_guard, start_loop
    cfg = SimpleNamespace(out_dir=str(tmp_path), resume=False, max_bad_steps=10)
    guard = make_guard(cfg, Runtime(torch.device("cpu"), torch.float32), {"lr": 1.0})
    run_ = start_loop(cfg, Runtime(torch.device("cpu"), torch.float32), guard, 0, resumed=False)
    guard.check(1, float("inf"), True)
    end_step(run_, 1, {"loss": float("inf")}, lambda step: pytest.fail("saved a bad step"), log_due=True,
             save_due=True)
    with pytest.raises(SystemExit, match=rf"(?s)stopped at step 1: 1 step.*{re.escape(str(ckpt_path(tmp_path)))}"):
        end_loop(run_)
    good = make_guard(cfg, Runtime(torch.device("cpu"), torch.float32), {"lr": 1.0})
    run_ = start_loop(cfg, Runtime(torch.device("cpu"), torch.float32), good, 0, resumed=False)
    good.check(1, 0.5, True)
    end_loop(run_)  # a run that ends on a good step goes on


@pytest.mark.parametrize("weight", [1e308, 5e-324, 1e7, 1e-7, 0, -1, "nan", True])
def test_2_preference_weights_out_of_range_are_refused_with_the_line(tmp_path, weight):
    from nanorlhf.prefs import PreferenceFileError, read_prefs
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "c", "rejected": "d",
                                                               "weight": weight}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreferenceFileError, match=r"line 2: 'weight' must be a number from 1e-06 to 1e\+06"):
        read_prefs(path)
    rows[1]["weight"] = 1e6  # the bounds themselves are fine
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prefs(path)[1]["weight"] == 1e6


# ---------------------------------------------------------------- 3. non-finite numbers

FLOAT_FLAGS = [(SFTConfig, "sft", "lr"), (SFTConfig, "sft", "grad_clip"), (SFTConfig, "sft", "temperature"),
               (SFTConfig, "sft", "min_lr"), (SFTConfig, "sft", "weight_decay"), (SFTConfig, "sft", "sft_dropout"),
               (RMConfig, "rm", "val_fraction"), (RMConfig, "rm", "rater_noise_low"),
               (RMConfig, "rm", "rater_bias_weight"), (PPOConfig, "ppo", "init_kl_coef"),
               (PPOConfig, "ppo", "value_lr"), (PPOConfig, "ppo", "target_kl"), (PPOConfig, "ppo", "lam"),
               (PPOConfig, "ppo", "gamma"), (PPOConfig, "ppo", "clip_range"), (PPOConfig, "ppo", "vf_coef"),
               (PPOConfig, "ppo", "no_eos_penalty"), (DPOConfig, "dpo", "beta"), (EvalConfig, "eval", "temperature"),
               (StudyConfig, "study", "kl_coef")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_3_non_finite_floats_are_refused_at_the_door(value):
    for cls, stage, name in FLOAT_FLAGS:
        with pytest.raises(ValueError, match=rf"--{name} {value} is not a finite number"):
            make_config(cls, stage, preset="tiny", **{name: float(value)})


def test_3_non_finite_flags_stop_the_scripts_with_one_line(root):
    cases = [("train_sft.py", "--lr", "nan"), ("train_sft.py", "--grad_clip", "nan"),
             ("train_sft.py", "--temperature", "nan"), ("train_sft.py", "--lr", "inf"),
             ("train_dpo.py", "--beta", "nan"), ("train_ppo.py", "--init_kl_coef", "-inf"),
             ("sample.py", "--temperature", "inf"), ("sample.py", "--top_p", "nan")]
    for i, (script, flag, value) in enumerate(cases):
        code, output = run(script, *(("x",) if script == "sample.py" else TINY), flag, value,
                           "--out_dir" if script != "sample.py" else "--ckpt", root / f"nonfinite{i}",
                           log=root / f"nonfinite{i}.log")
        assert code == 2 and flag in output and "Traceback" not in output, (script, flag, value, output[-2000:])
        assert not os.path.exists(root / f"nonfinite{i}")


def diverged_model():
    model = make_gpt()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("inf"))  # what --lr 1e30 does to the weights
    return model


@pytest.mark.parametrize("how", ["generate", "naive", "top_k", "top_p", "one_bad_row", "one_inf_logit"])
def test_3_sampling_non_finite_logits_stops_with_the_cause(how):
    """Today: `index 23 is out of bounds` from deep inside the draw (a device assert on CUDA)."""
    model = diverged_model()
    prompt, mask = left_padded([3, 5, 2], 23, pad_id=0)
    kwargs = {"top_k": dict(top_k=5), "top_p": dict(top_p=0.9)}.get(how, {})
    if how == "one_bad_row":  # one row's logits nan, the others fine: still a diverged model
        model = make_gpt()
        forward = model.forward
        model.forward = lambda idx, **kw: forward(idx, **kw).index_fill(0, torch.tensor([1]), float("nan"))
    if how == "one_inf_logit":  # +inf on one token of every row: softmax gives nan
        model = make_gpt()
        forward = model.forward
        model.forward = lambda idx, **kw: forward(idx, **kw).index_fill(-1, torch.tensor([7]), float("inf"))
    sampler = naive_generate if how == "naive" else generate
    with pytest.raises(RuntimeError, match=r"non-finite logits \(nan/inf\).*diverged.*last good checkpoint"):
        sampler(model, prompt, mask, 6, eos_id=0, generator=torch.Generator().manual_seed(0), **kwargs)


def test_3_masked_tokens_of_minus_inf_still_sample():
    """-inf on some tokens is a mask, not a divergence: the draw never picks them and no error is raised."""
    logits = torch.randn(4, 10)
    logits[:, :7] = float("-inf")
    token, logprob = sample_token(logits, generator=torch.Generator().manual_seed(0))
    assert (token >= 7).all() and torch.isfinite(logprob).all()


def test_3_a_diverging_sft_run_that_prints_samples_stops_by_the_guard(root, sft):
    """The README's NaN example with samples every step: the guard must stop the run with the likely cause,
    before a sample is drawn from the broken weights (today: a traceback from inside the sampler)."""
    out = root / "sft_nan_samples"
    shutil.copytree(sft, out)
    code, output = run("train_sft.py", *TINY, "--out_dir", out, "--resume", "--lr", "1e30", "--max_iters", "30",
                       "--sample_every", "1", log=root / "sft_nan_samples.log")
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert "learning rate is too high" in output
    assert load_checkpoint(out, "sft")["step"] == 8


def test_3_a_ppo_policy_that_diverges_stops_by_the_guard_at_its_next_rollout(root, sft, rm):
    """--lr 1e30 with one update per iteration: the update's loss and gradients are finite, the weights it
    leaves are not; the next rollout samples from them. A guard message and exit 1, not a sampler traceback."""
    out = root / "ppo_diverged"
    code, output = run("train_ppo.py", *TINY, "--sft_dir", sft, "--rm_dir", rm, "--out_dir", out, "--lr", "1e30",
                       "--ppo_epochs", "1", "--n_minibatches", "1", log=root / "ppo_diverged.log")
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert "weights diverged" in output and "learning rate is too high" in output
    assert not os.path.exists(ckpt_path(out)) and str(ckpt_path(out)) in output.splitlines()[-1]


# ---------------------------------------------------------------- 4. two runs, one folder

def test_4_a_second_run_on_the_same_out_dir_is_refused_and_a_killed_run_leaves_no_lock(root):
    out = root / "sft_two_runs"
    first = start("train_sft.py", *TINY, "--out_dir", out, "--max_iters", "100000", "--eval_every", "100000",
                  "--sample_every", "100000", log=root / "first.log")
    try:
        wait_for(root / "first.log", r"^step 2 \|", first)
        code, output = run("train_sft.py", *TINY, "--out_dir", out, "--max_iters", "2", log=root / "second.log")
        assert code != 0 and str(out) in output and "Traceback" not in output, output[-3000:]
        assert not re.search(r"^step 1 \|", output, re.M)
    finally:
        os.kill(first, signal.SIGKILL)
        wait(first)
    code, output = run("train_sft.py", *TINY, "--out_dir", out, "--max_iters", "2", "--eval_every", "1",
                       log=root / "third.log")
    assert code == 0, output[-3000:]  # the killed run's lock does not stay behind


@pytest.mark.parametrize("script", ["train_rm.py", "train_dpo.py", "train_ppo.py"])
def test_4_every_trainer_refuses_a_folder_another_run_holds(root, sft, rm, script, tmp_path):
    """The lock of every trainer, held here by another process: refused at once with its pid, nothing
    written; once that process ends, the folder is free again (the kernel drops the lock)."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / ".lock").write_text(f"{holder.pid}\n")
        rm_dir = ("--rm_dir", rm) if script != "train_rm.py" else ()
        code, output = run(script, *TINY, "--sft_dir", sft, *rm_dir, "--out_dir", out, log=tmp_path / "run.log")
        assert code == 1 and output.splitlines()[-1] == (f"another run (pid {holder.pid}) is writing {out}: wait for "
                                                         f"it, or pass another --out_dir"), output[-2000:]
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- 5. data replaced before it is safe

def test_5_a_new_rm_run_that_fails_before_its_first_checkpoint_leaves_the_folder_as_it_was(root, sft, rm, tmp_path):
    """A new train_rm.py --prefs in a finished RM's folder, stopped by the guard (--lr 1e30) long before
    its first checkpoint (an epoch of 36 steps): prefs.jsonl must still be the pairs the RM in ckpt.pt was
    trained on (train_dpo.py --rm_dir reads them beside it)."""
    out = tmp_path / "rm"
    shutil.copytree(rm, out)
    old_prefs, old_ckpt = read(out / "prefs.jsonl"), read(ckpt_path(out))
    rows = [json.loads(line) for line in open(rm / "prefs.jsonl")]
    new = tmp_path / "new.jsonl"  # other pairs: each one reversed, 80 of them
    new.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                           for r in (rows * 80)[:80]))
    code, output = run("train_rm.py", *TINY, "--sft_dir", sft, "--out_dir", out, "--prefs", new, "--lr", "1e30",
                       "--batch_size", "2", "--max_bad_steps", "2", log=tmp_path / "rm.log")
    assert code != 0 and "Traceback" not in output, output[-3000:]
    assert read(ckpt_path(out)) == old_ckpt
    assert read(out / "prefs.jsonl") == old_prefs


# ---------------------------------------------------------------- 6. orphans

def test_6_sigterm_to_ppo_stops_the_sft_stage_it_trains_as_a_child(root, rm):
    """train_ppo.py trains a missing SFT stage in a child process; SIGTERM to the parent must reach the
    child, and the parent must wait for it: no stage keeps writing after the command has ended."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train_ppo.py", *TINY, "--sft_dir", str(root / "sft_child"),
                             "--rm_dir", str(rm), "--out_dir", str(root / "ppo_orphan")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        for line in proc.stdout:
            if line.startswith("step 1 |"):  # the child's first SFT step
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    children = [int(pid) for pid in f.read().split()]
                proc.send_signal(signal.SIGTERM)
                break
        proc.wait(timeout=120)
        assert children, "train_ppo.py did not train the SFT stage in a child process"
        orphans = [pid for pid in children if alive(pid)]
        assert not orphans, f"train_ppo.py exited {proc.returncode}; its child {orphans} still runs"
        assert proc.returncode != 0
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()


def test_6_parallel_stages_run_at_most_n_at_once_and_a_signal_reaches_every_running_one(tmp_path):
    """guard.run_children (study.py frontier --parallel): at most `parallel` children at a time, each timed;
    a SIGTERM to the parent reaches every running child, starts no new one, and the parent waits for all."""
    from nanorlhf.guard import run_children
    child = ("import os, signal, sys, time\n"
             "def stop(signum, frame):\n    open(sys.argv[1] + '.stopped', 'w').write(str(signum))\n    sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "open(sys.argv[1] + '.start', 'w').write(repr(time.time()))\n"
             "time.sleep(float(sys.argv[2]))\n"
             "open(sys.argv[1] + '.end', 'w').write(repr(time.time()))\n")
    names = [str(tmp_path / f"c{i}") for i in range(4)]
    logs = [open(n + ".log", "w") for n in names]
    results = run_children([[sys.executable, "-c", child, n, "0.5"] for n in names], logs, 2)
    assert [code for code, _ in results] == [0, 0, 0, 0] and all(wall >= 0.5 for _, wall in results)
    spans = [tuple(float(open(n + ext).read()) for ext in (".start", ".end")) for n in names]
    at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert at_once == 2, spans  # two ran side by side, never three
    # SIGTERM while the first two run: both stop through their handler, the other two never start
    parent = ("import sys\nfrom nanorlhf.guard import run_children\n"
              "names = sys.argv[2:]\nlogs = [open(n + '.log', 'w') for n in names]\n"
              "print(run_children([[sys.executable, '-c', sys.argv[1], n, '60'] for n in names], logs, 2), flush=True)\n")
    names = [str(tmp_path / f"s{i}") for i in range(4)]
    proc = subprocess.Popen([sys.executable, "-c", parent, child, *names], cwd=REPO, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all(os.path.exists(n + ".start") for n in names[:2]) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert out.startswith("[(143, ") and out.count("(143, ") == 2 and out.count("(None, 0.0)") == 2, out
    assert [os.path.exists(n + ".stopped") for n in names] == [True, True, False, False]
    assert not any(os.path.exists(n + ".start") for n in names[2:])


def test_6_a_study_killed_mid_batch_keeps_the_record_of_each_run_that_finished(tmp_path):
    """run_stages records a run (stage_run.json) as soon as its child exits 0, not when the whole batch ends: a
    study killed while a second run is still going (SIGKILL, where no handler runs) keeps the first run's record, so
    the next study can tell that run finished."""
    quick, slow = tmp_path / "quick.py", tmp_path / "slow.py"
    quick.write_text("print('quick done')\n")
    slow.write_text("import os, sys, time\nopen(sys.argv[-1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    parent = ("import sys\nfrom nanorlhf.studies import run_stages\n"
              "run_stages([(sys.argv[1], sys.argv[3], {}), (sys.argv[2], sys.argv[4], {'pid': sys.argv[5]})], 2)\n")
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    pid_file = str(tmp_path / "slow.pid")
    proc = subprocess.Popen([sys.executable, "-c", parent, str(quick), str(slow), *dirs, pid_file], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    record = os.path.join(dirs[0], "stage_run.json")
    try:
        deadline = time.time() + 30
        while not (os.path.exists(record) and os.path.exists(pid_file)) and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()  # SIGKILL: the batch's end never comes
        out, _ = proc.communicate(timeout=30)
    finally:
        if os.path.exists(pid_file) and open(pid_file).read().strip():
            try:
                os.kill(int(open(pid_file).read()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert os.path.exists(record), out  # the quick run finished while the slow one ran: recorded then
    with open(record) as f:
        assert json.load(f)["wall_s"] >= 0
    assert "quick done" in open(os.path.join(dirs[0], "stdout.log")).read()
    assert not os.path.exists(os.path.join(dirs[1], "stage_run.json"))  # the killed one is not recorded


def test_6_a_child_stage_stops_when_its_parent_is_killed_with_sigkill(tmp_path):
    """No handler runs on SIGKILL, so the parent cannot pass it on: the kernel sends the child SIGTERM when
    its parent dies (setup_runtime sets PR_SET_PDEATHSIG in a stage run_child started), and the child stops
    as on any SIGTERM."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    child_code = ("import signal, sys, time\n"
                  "def stop(signum, frame):\n    open(sys.argv[1], 'w').write(str(signum))\n    sys.exit(143)\n"
                  "signal.signal(signal.SIGTERM, stop)\nfrom nanorlhf.guard import die_with_parent\n"
                  "die_with_parent()\nprint('child ready', flush=True)\ntime.sleep(60)\n")
    parent_code = ("import sys\nfrom nanorlhf.guard import run_child\n"
                   "sys.exit(run_child([sys.executable, '-c', sys.argv[1], sys.argv[2]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", parent_code, child_code, str(tmp_path / "flag")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    children = []
    try:
        assert proc.stdout.readline().strip() == "child ready"
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        assert children
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while any(alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in children), "the child outlived its SIGKILLed parent"
        assert (tmp_path / "flag").read_text() == str(int(signal.SIGTERM))  # stopped by SIGTERM, its handler ran
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


def test_6_run_child_passes_signals_on_and_waits(tmp_path):
    """runtime.run_child (train_ppo.py's missing stages, study.py's stages): SIGTERM to the parent reaches
    the child, which here takes 0.5 s to finish after it; the parent ends only after the child."""
    child_code = ("import signal, sys, time\n"
                  "def stop(signum, frame):\n    time.sleep(0.5)\n    open(sys.argv[1], 'w').write('stopped')\n"
                  "    sys.exit(143)\n"
                  "signal.signal(signal.SIGTERM, stop)\nprint('child ready', flush=True)\ntime.sleep(60)\n")
    parent_code = ("import sys\nfrom nanorlhf.guard import run_child\n"
                   "sys.exit(run_child([sys.executable, '-c', sys.argv[1], sys.argv[2]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", parent_code, child_code, str(tmp_path / "flag")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "child ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert (tmp_path / "flag").read_text() == "stopped"  # written by the child before the parent ended
    finally:
        proc.kill()
        proc.communicate()


# ---------------------------------------------------------------- 7. downloads accept garbage

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in.</body></html>\n" * 50


@pytest.mark.parametrize("payload", [HTML, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40,
                                     b"just some words without any story in them\n" * 100],
                         ids=["html", "binary", "no_stories"])
def test_7_a_download_that_is_not_the_corpus_is_refused_and_not_trusted(tmp_path, payload):
    path = str(tmp_path / "corpus.txt")
    with RangeServer(payload) as server, pytest.raises(RuntimeError, match="not the story corpus.*nothing was saved"):
        download(server.url, path)
    assert os.listdir(tmp_path) == []  # no corpus, no recorded checksum, no part file to resume
    with RangeServer(CORPUS) as server:  # the next attempt starts clean and gets the real file
        download(server.url, path)
    assert read(path) == CORPUS


@pytest.mark.parametrize("range_start", [0, 1000], ids=["from_byte_0", "from_another_byte"])
def test_7_a_206_that_does_not_start_where_asked_is_not_spliced(tmp_path, range_start):
    """The partial file holds 5000 bytes; the server answers `Range: bytes=5000-` with a 206 from another
    byte. Appending that would splice the file: it is taken from the start instead."""
    path = str(tmp_path / "corpus.txt")
    with open(path + ".part", "wb") as f:
        f.write(CORPUS[:5000])
    with RangeServer(CORPUS, range_start=range_start) as server:
        download(server.url, path, chunk=1000)
    assert server.ranges[0] == "bytes=5000-"
    assert read(path) == CORPUS
    assert read(path + ".sha256").decode().strip() == hashlib.sha256(CORPUS).hexdigest()


# ---------------------------------------------------------------- 8. late failures

def test_8_kl_horizon_zero_is_refused_before_any_work(root):
    """Today: ZeroDivisionError after the first PPO iteration."""
    code, output = run("train_ppo.py", *TINY, "--kl_horizon", "0", "--out_dir", root / "kl0", log=root / "kl0.log")
    assert code == 2 and "kl_horizon must be >= 1" in output and "Traceback" not in output, output[-2000:]


def test_8_an_out_dir_that_cannot_be_written_fails_before_the_rm_samples(root, sft):
    """The out_dir is checked first, not after the whole sampling and labelling phase. (A path under a
    file: a read-only folder would not stop root, who runs some CI containers.)"""
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    code, output = run("train_rm.py", *TINY, "--sft_dir", sft, "--out_dir", blocker / "rm",
                       log=root / "unwritable.log")
    assert code != 0 and str(blocker / "rm") in output and "Traceback" not in output, output[-3000:]
    assert "sampled " not in output  # refused before the responses were sampled


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py", "train_ppo.py"])
def test_8_every_trainer_checks_its_out_dir_first(root, sft, rm, script):
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    inputs = {"train_sft.py": (), "train_dpo.py": ("--sft_dir", sft, "--rm_dir", rm),
              "train_ppo.py": ("--sft_dir", sft, "--rm_dir", rm)}[script]
    code, output = run(script, *TINY, *inputs, "--out_dir", blocker / script, log=root / "unwritable.log")
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert output.splitlines()[-1].startswith(f"cannot write to --out_dir {blocker / script}"), output[-2000:]


@pytest.mark.parametrize("script,flag,value", [("train_ppo.py", "--eval_prompts", 10**9),
                                                ("train_ppo.py", "--sample_batch", 10**7),
                                                ("train_sft.py", "--sample_batch", 10**7),
                                                ("train_rm.py", "--n_prompts", 10**9),
                                                ("train_dpo.py", "--batch_size", 10**7)])
def test_8_batches_too_large_for_memory_are_refused_before_any_work(tmp_path, script, flag, value):
    """Today: found only when it happens (the final evaluation samples --eval_prompts after the training).
    Refused before the out_dir is made or an earlier stage is trained, naming the flag and a value that fits."""
    out = tmp_path / "out"
    code, output = run(script, *TINY, flag, value, "--out_dir", out / "run", log=tmp_path / "log")
    assert code == 1 and "Traceback" not in output, output[-2000:]
    line = output.strip().splitlines()[-1]
    assert line.startswith(f"{flag} {value} is too large for memory") and f"use {flag} " in line, line
    assert not out.exists()  # nothing made, nothing trained
    fits = int(line.split(f"use {flag} ")[1].split()[0])
    assert 0 < fits < value


def test_8_the_memory_estimate_is_a_lower_bound_so_a_refusal_is_never_wrong(tmp_path):
    """Peak resident memory of sampling and then scoring a batch (in a fresh process, Linux's peak counter
    reset first) is at least what check_memory counts for those phases: it refuses only what cannot fit."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's resettable peak-memory counter")
    script = tmp_path / "peak.py"
    script.write_text(f"""
import sys, types
import torch
sys.path.insert(0, {str(REPO)!r})
from nanorlhf.checks import _memory_phases
from nanorlhf.model import GPT, GPTConfig, response_logprobs
from nanorlhf.sampler import generate
torch.manual_seed(0)
cfg = types.SimpleNamespace(vocab_size=8192, n_embd=64, n_layer=2, n_head=2, block_size=64, sample_batch=192,
                            max_prompt_tokens=16, max_new_tokens=16)
model = GPT(GPTConfig(vocab_size=8192, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
need = {{what.split(" (")[0]: n for _, _, n, what in _memory_phases(cfg, 4)}}
def status(key):  # VmRSS: resident now, VmHWM: its peak since the last reset
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
def peak():
    return status("VmHWM")
def run(B):
    prompt = torch.randint(0, 8000, (B, 16))
    mask = torch.ones(B, 16, dtype=torch.long)
    out = generate(model, prompt, mask, 16, eos_id=8191)
    p0 = peak()
    with torch.inference_mode():
        response_logprobs(model, prompt, mask, out["tokens"], out["mask"])
    return out, p0
run(2)  # warm up: code, kernels, the allocator
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from what is resident now
base = status("VmRSS")
_, after_sampling = run(cfg.sample_batch)
after_scoring = peak()
print(after_sampling - base, need["sampling a batch"], after_scoring - base, need["scoring a batch"])
assert after_sampling - base >= need["sampling a batch"], (after_sampling - base, need)
assert after_scoring - base >= need["scoring a batch"], (after_scoring - base, need)
""")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


# ---------------------------------------------------------------- 9. tracebacks where a message is promised

SIZE_FLAGS = [(SFTConfig, "sft", n) for n in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                              "batch_size", "grad_accum", "max_iters", "eval_iters", "sample_batch",
                                              "max_new_tokens", "max_prompt_tokens", "log_every")] + \
             [(RMConfig, "rm", n) for n in ("n_prompts", "epochs", "norm_samples", "eval_samples", "k_responses")] + \
             [(PPOConfig, "ppo", n) for n in ("rollout_batch", "n_minibatches", "ppo_epochs",
                                              "eval_prompts", "save_every", "kl_horizon")] + \
             [(DPOConfig, "dpo", "batch_size"), (EvalConfig, "eval", "n_prompts"),
              (StudyConfig, "study", "eval_prompts")]


@pytest.mark.parametrize("value", [0, -1])
def test_9_zero_and_negative_sizes_are_refused_naming_the_flag(value):
    for cls, stage, name in SIZE_FLAGS:
        with pytest.raises(ValueError, match=rf"{name}\b.*must be >= 1"):
            make_config(cls, stage, preset="tiny", **{name: value})
    for cls, stage, name in [(EvalConfig, "eval", "n_samples"), (StudyConfig, "study", "rounds"),
                             (SFTConfig, "sft", "tokenizer_chars"),  # 0: none shown, no round, the whole corpus
                             (PPOConfig, "ppo", "iterations")]:  # 0: only the final evaluation
        if value < 0:
            with pytest.raises(ValueError, match=rf"{name} must be >= 0"):
                make_config(cls, stage, preset="tiny", **{name: value})
        else:
            make_config(cls, stage, preset="tiny", **{name: value})


@pytest.mark.parametrize("cls, stage, name, bad", [
    (SFTConfig, "sft", "sft_dropout", [-0.1, 1.0, 1.5]), (RMConfig, "rm", "val_fraction", [0.0, 1.0, -0.5, 2.0]),
    (PPOConfig, "ppo", "gamma", [-0.1, 1.01]), (PPOConfig, "ppo", "lam", [-1.0, 2.0]),
    (PPOConfig, "ppo", "clip_range", [0.0, -0.2]), (SFTConfig, "sft", "grad_clip", [0.0, -1.0]),
    (DPOConfig, "dpo", "beta", [0.0, -0.1]), (SFTConfig, "sft", "weight_decay", [-0.1]),
    (PPOConfig, "ppo", "init_kl_coef", [-0.1])])
def test_9_out_of_range_rates_and_probabilities_are_refused(cls, stage, name, bad):
    for value in bad:
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            make_config(cls, stage, preset="tiny", **{name: value})


def test_9_bad_lists_of_numbers_are_refused():
    for bad in ("0", "1,-4", "two", "1,nan"):
        with pytest.raises(ValueError, match="--bon .* must be a comma-separated list of whole numbers >= 1"):
            make_config(EvalConfig, "eval", preset="tiny", bon=bad)
    for bad in ("0.1,0", "nan", "inf", "-0.1", "a"):
        with pytest.raises(ValueError, match="--betas .* must be a comma-separated list of finite numbers > 0"):
            make_config(StudyConfig, "study", preset="tiny", betas=bad)
    assert make_config(EvalConfig, "eval", preset="tiny", bon="").bon == ""  # no best-of-n at all


def test_9_bad_sizes_stop_the_scripts_with_one_line(root):
    cases = [("train_sft.py", "--n_layer", "0"), ("train_sft.py", "--n_head", "0"), ("train_sft.py", "--n_embd", "-8"),
             ("train_ppo.py", "--eval_prompts", "0"), ("train_rm.py", "--val_fraction", "1.5"),
             ("eval.py", "--n_prompts", "-1"), ("sample.py", "--max_new_tokens", "0"), ("sample.py", "--top_p", "1.5"),
             ("sample.py", "--top_k", "0"), ("sample.py", "--n", "0")]
    for i, (script, flag, value) in enumerate(cases):
        code, output = run(script, *(("x",) if script == "sample.py" else TINY), flag, value,
                           "--out_dir" if script != "sample.py" else "--ckpt", root / f"badsize{i}",
                           log=root / f"badsize{i}.log")
        assert code == 2 and flag.lstrip("-") in output and "Traceback" not in output, (script, flag, output[-2000:])


def test_9_malformed_metrics_lines_on_resume_are_kept_and_skipped(root, sft):
    """A hand-edited metrics.jsonl (lines that are not records) must not stop --resume, and the run must not
    delete them; the plot and the log go on from the valid records."""
    out = root / "sft_bad_metrics"
    shutil.copytree(sft, out)
    lines = open(out / "metrics.jsonl").read().splitlines()
    foreign = ["not json at all", "[1, 2, 3]", '{"step": "three"}', '"a string"', "{}"]
    lines[2:2] = foreign
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, output = run("train_sft.py", *TINY, "--out_dir", out, "--resume", "--max_iters", "10",
                       log=root / "bad_metrics.log")
    assert code == 0 and "Traceback" not in output, output[-3000:]
    assert "not metrics records" in output
    kept = open(out / "metrics.jsonl").read().splitlines()
    assert all(line in kept for line in foreign)  # nothing the user wrote is deleted
    records = [json.loads(line) for line in kept if line not in foreign]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))


@pytest.mark.parametrize("damage", ["no_model_config", "no_tokenizer", "no_config", "extra_weight",
                                    "missing_weight", "wrong_shape", "model_not_a_dict"])
def test_9_hand_made_checkpoints_with_missing_or_extra_fields_get_one_line(root, sft, damage, tmp_path):
    """A checkpoint dict edited by hand: the scripts that read it work, or stop with one line naming it."""
    ckpt = load_checkpoint(sft, "sft")
    if damage.startswith("no_"):
        del ckpt[damage.removeprefix("no_")]
    elif damage == "extra_weight":
        ckpt["model"]["extra.weight"] = torch.zeros(3)
    elif damage == "wrong_shape":
        key = next(k for k, v in ckpt["model"].items() if v.dim() == 2)
        ckpt["model"][key] = torch.zeros(3, 3)
    elif damage == "model_not_a_dict":
        ckpt["model"] = [1, 2, 3]
    else:
        del ckpt["model"][next(iter(ckpt["model"]))]
    save_checkpoint(tmp_path / "sft", ckpt)
    for script in ("train_rm.py", "sample.py"):
        args = ("x", "--ckpt", tmp_path / "sft") if script == "sample.py" else \
            (*TINY, "--sft_dir", tmp_path / "sft", "--out_dir", tmp_path / "rm")
        code, output = run(script, *args, log=tmp_path / "run.log")
        assert "Traceback" not in output, (script, output[-2000:])
        if code != 0:  # a field the script does not need may be missing; else one line naming the file
            assert code == 1 and str(tmp_path / "sft") in output.splitlines()[-1], (script, output[-2000:])


@pytest.fixture(scope="module")
def dpo(root, sft, rm):
    out = root / "dpo"
    code, output = run("train_dpo.py", *TINY, "--sft_dir", sft, "--rm_dir", rm, "--out_dir", out, log=root / "dpo.log")
    assert code == 0, output[-3000:]
    return out


def test_9_a_full_disk_at_a_save_says_so_and_keeps_the_last_checkpoint(root, sft, rm, dpo):
    """Files may not grow past half a checkpoint (RLIMIT_FSIZE: the write fails with EFBIG as it would
    with ENOSPC on a full disk). The resumed run's final save fails: one line naming the file and the
    fix, a non-zero exit, no claim of a save, and the previous checkpoint still whole."""
    out = root / "dpo_disk_full"
    shutil.copytree(dpo, out)
    before = read(ckpt_path(out))
    code, output = run("train_dpo.py", *TINY, "--sft_dir", sft, "--rm_dir", rm, "--out_dir", out, "--resume",
                       "--max_iters", "6", log=root / "disk_full.log", limit_file_size=len(before) // 2)
    assert code not in (0, 130) and "Traceback" not in output, output[-3000:]
    assert str(ckpt_path(out)) not in claimed_saves(output)
    assert "ckpt.pt" in output.splitlines()[-1]
    assert read(ckpt_path(out)) == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # the half-written file is removed
    assert math.isfinite(load_checkpoint(out, "dpo")["step"])
