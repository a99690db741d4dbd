"""Subprocess smoke runs of the training scripts with --preset tiny, as a user runs them
from the repository root: they finish, write their files, resume, and fail with a message."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from nanorlhf.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
    # one thread: the tiny models run many times faster than with an OpenMP pool on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def logged_steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    check_ok(run("train_sft.py", "--preset", "tiny", "--out_dir", out))
    return out


def test_sft_writes_checkpoint_metrics_and_plot(sft_dir):
    for name in ("ckpt.pt", "metrics.jsonl", "loss.png"):
        assert os.path.getsize(os.path.join(sft_dir, name)) > 0, name
    ckpt = load_checkpoint(sft_dir, "sft")
    assert ckpt["step"] == 8 and ckpt["config"]["preset"] == "tiny"
    assert ckpt["model_config"]["dropout"] == 0.0
    assert logged_steps(sft_dir) == list(range(1, 9))
    with open(os.path.join(sft_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert all(r["tok_per_s"] > 0 and "mfu" not in r for r in records)  # speed logged; no MFU on a CPU


def test_sft_resume_continues_from_step_8(sft_dir, tmp_path):
    out = str(tmp_path / "sft")
    shutil.copytree(sft_dir, out)  # the shared SFT run stays as it was for the RM test
    result = run("train_sft.py", "--preset", "tiny", "--out_dir", out, "--resume", "--max_iters", "12")
    check_ok(result)
    assert "at step 8" in result.stdout
    assert load_checkpoint(out, "sft")["step"] == 12
    assert logged_steps(out) == list(range(1, 13))  # the log continues: 1..8 kept, 9..12 appended


def test_sft_grad_accum_equals_one_batch_of_the_same_stories(tmp_path):
    """2 micro-batches of 8 = one batch of 16 (the same rows: data_rng draws them in the same order): the loss is
    the mean over every counted token of the step, not a mean of the micro-batches' means (which differs
    with --loss_on response, where rows count different numbers of tokens)."""
    runs = {}
    for name, flags in (("one", ["--batch_size", "16"]), ("accum", ["--batch_size", "8", "--grad_accum", "2"])):
        out = str(tmp_path / name)
        check_ok(run("train_sft.py", "--preset", "tiny", "--out_dir", out, "--sft_dropout", "0", "--loss_on",
                     "response", "--max_iters", "1", "--eval_every", "1", *flags))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[name] = json.loads(f.readline())
    for key in ("loss", "grad_norm"):
        assert runs["accum"][key] == pytest.approx(runs["one"][key], rel=2e-6), key


def test_sft_keeps_the_checkpoint_of_the_best_validation_loss(sft_dir, tmp_path):
    out = str(tmp_path / "sft")
    shutil.copytree(sft_dir, out)
    best = load_checkpoint(out, "sft")["val_loss"]
    # a learning rate of 3 wrecks the weights: the validation loss at steps 12 and 16 is far above step 8's
    result = run("train_sft.py", "--preset", "tiny", "--out_dir", out, "--resume", "--max_iters", "16",
                 "--lr", "3", "--min_lr", "3")
    check_ok(result)
    val = {r["step"]: r["val_loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "val_loss" in r}
    assert val[12] > best and val[16] > best
    ckpt = load_checkpoint(out, "sft")
    assert ckpt["step"] == 8 and ckpt["best_val_loss"] == ckpt["val_loss"] == best
    assert "validation loss rose after step 8" in result.stdout and f"validation loss {best:.3f}" in result.stdout


def test_rm_trains_from_the_sft_checkpoint(sft_dir, tmp_path):
    out = str(tmp_path / "rm")
    check_ok(run("train_rm.py", "--preset", "tiny", "--sft_dir", sft_dir, "--out_dir", out))
    for name in ("ckpt.pt", "metrics.jsonl", "accuracy.png", "prefs.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ckpt = load_checkpoint(out, "rm")
    assert ckpt["step"] > 0 and math.isfinite(ckpt["gain"]) and math.isfinite(ckpt["bias"])
    assert ckpt["tokenizer"] == load_checkpoint(sft_dir, "sft")["tokenizer"]
    # docs/design.md detail 11: the gain and bias PPO reads make the RM's scores on SFT samples mean 0, std 1
    with open(os.path.join(out, "metrics.jsonl")) as f:
        report = [json.loads(line) for line in f][-1]
    assert (report["gain"], report["bias"]) == (ckpt["gain"], ckpt["bias"])
    assert abs(report["norm_mean"]) < 1e-5 and report["norm_std"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("taste", ["flowery", "sycophancy"])
def test_rm_with_biased_raters_reports_both_correlations_with_the_taste(sft_dir, tmp_path, taste):
    out = str(tmp_path / "rm")
    result = run("train_rm.py", "--preset", "tiny", "--sft_dir", sft_dir, "--out_dir", out, "--rater_bias", taste)
    check_ok(result)
    assert f"bias {taste}" in result.stdout and f"hidden taste ({taste})" in result.stdout
    report = load_checkpoint(out, "rm")["report"]
    for key in (f"spearman_rm_{taste}", f"spearman_gold_{taste}"):
        assert math.isnan(report[key]) or -1 <= report[key] <= 1, key  # nan: the taste is absent from every sample
        assert f"{report[key]:.3f}" in result.stdout


# ---------------------------------------------------------------- errors a user meets first

def test_rm_with_nothing_to_train_on_says_so(sft_dir, tmp_path):
    # one prompt: its pairs all go to validation, and an RM trained on nothing was saved as if finished
    result = run("train_rm.py", "--preset", "tiny", "--sft_dir", sft_dir, "--out_dir", str(tmp_path), "--n_prompts", "1")
    assert result.returncode == 1 and "0 to train on" in result.stderr and "--n_prompts" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(str(tmp_path), "ckpt.pt"))


def test_rm_without_sft_checkpoint_names_the_command(tmp_path):
    result = run("train_rm.py", "--preset", "tiny", "--sft_dir", str(tmp_path / "nothing"),
                 "--out_dir", str(tmp_path / "rm"))
    assert result.returncode != 0
    assert "python train_sft.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_sft_with_missing_dataset_says_so(tmp_path):
    result = run("train_sft.py", "--preset", "tiny", "--dataset", "/nonexistent", "--out_dir", str(tmp_path))
    assert result.returncode != 0
    assert "/nonexistent" in result.stderr and "--dataset sample" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py", "eval.py",
                                    "study.py", "sample.py", "bench.py"])
def test_help_lists_the_flags(script):
    result = run(script, "--help")  # a "%" in a field's comment once broke argparse's help formatting
    assert result.returncode == 0 and "--" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("flag, value, need", [("--temperature", "0", "> 0"), ("--top_k", "0", ">= 1"),
                                              ("--top_p", "1.5", "between 0"), ("--n", "0", ">= 1")])
def test_sample_refuses_settings_that_cannot_sample(flag, value, need):
    result = run("sample.py", flag, value, "Once upon a time")
    assert result.returncode == 2 and f"{flag} must be {need}" in result.stderr and "Traceback" not in result.stderr


def test_sample_fits_prompts_to_the_shortest_model(sft_dir, tmp_path):
    """--compare with a model of a shorter block: prompts are cut to fit both (it crashed in the model)."""
    short = str(tmp_path / "sft40")
    check_ok(run("train_sft.py", "--preset", "tiny", "--block_size", "40", "--max_prompt_tokens", "16",
                 "--max_new_tokens", "16", "--max_iters", "1", "--out_dir", short))
    prompt = "Once upon a time, there was a girl named Lily who loved to play in the big green park every day."
    result = run("sample.py", "--ckpt", sft_dir, "--compare", short, "--rm_dir", str(tmp_path / "none"), prompt)
    check_ok(result)
    assert "PROMPT:" in result.stdout and "Traceback" not in result.stderr


def test_unknown_flag_is_rejected():
    result = run("train_sft.py", "--no_such_flag", "3")
    assert result.returncode == 2
    assert "unrecognized arguments: --no_such_flag" in result.stderr


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_sft_compiled_with_its_loss_matches_eager(tmp_path):
    """--compile traces the model and its cross-entropy as one graph: the same losses as eager."""
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        out = str(tmp_path / name)
        check_ok(run("train_sft.py", "--preset", "tiny", "--out_dir", out, "--sft_dropout", "0", *flags, timeout=600))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in runs["compiled"]] == [r["step"] for r in runs["eager"]] == list(range(1, 9))
    for a, b in zip(runs["eager"], runs["compiled"]):
        for key in ("loss", "grad_norm") + (("val_loss",) if "val_loss" in a else ()):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
