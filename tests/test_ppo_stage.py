"""Subprocess runs of train_ppo.py on the tiny preset: the whole pipeline from nothing,
--resume, and the PPO details that only a real loop can show (docs/design.md details 3, 4, 9)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def run_ppo(dirs, out, *args):
    """train_ppo.py on the tiny preset from the pipeline fixture's SFT and RM."""
    return run("train_ppo.py", "--preset", "tiny", "--sft_dir", dirs["sft"], "--rm_dir", dirs["rm"], "--out_dir", out,
               *args)


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """python train_ppo.py from nothing: it must train SFT and the RM itself first. Run from another
    directory with relative paths: the earlier stages must land where this run then looks for them."""
    root = tmp_path_factory.mktemp("ppo")
    dirs = {k: str(root / k) for k in ("sft", "rm", "ppo")}
    result = run(os.path.join(REPO, "train_ppo.py"), "--preset", "tiny", "--sft_dir", "sft", "--rm_dir", "rm",
                 "--out_dir", "ppo", "--iterations", "3", "--temperature", "0.7", "--save_every", "2", cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return dirs, result


def test_pipeline_from_nothing_trains_the_earlier_stages(pipeline):
    dirs, result = pipeline
    assert "no sft checkpoint" in result.stdout and "no rm checkpoint" in result.stdout
    for stage in ("sft", "rm", "ppo"):
        assert os.path.exists(os.path.join(dirs[stage], "ckpt.pt"))
    assert os.path.exists(os.path.join(dirs["ppo"], "ppo.png"))
    ckpt = torch.load(os.path.join(dirs["ppo"], "ckpt.pt"), weights_only=True)
    assert ckpt["stage"] == "ppo" and ckpt["step"] == 3
    assert "held-out evaluation" in result.stdout and "PPO " in result.stdout


def test_first_minibatch_ratio_is_exactly_one_and_logprobs_align(pipeline):
    # detail 3: the first minibatch of the first epoch reproduces the old logprobs exactly;
    # detail 4: at temperature 0.7 the sampler's logprobs equal the teacher-forced pass
    dirs, _ = pipeline
    steps = [r for r in records(os.path.join(dirs["ppo"], "metrics.jsonl")) if "reward" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["first_ratio"] == 1.0
        assert r["first_approx_kl"] == 0.0
        assert r["logprob_gap"] < 1e-4
    for key in ("reward", "gold", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "ratio", "value_loss",
                "explained_var", "resp_len", "t_rollout", "t_score", "t_learn"):
        assert key in steps[0]
    first = steps[0]  # before any update the policy is the reference
    # detail 4 in the reference pass too: at temperature 0.7 both passes agree, so the KL is exactly 0
    assert first["kl"] == 0.0
    # detail 11: the value model is the RM with its head zeroed: V = 0 explains none of the returns
    assert first["explained_var"] == 0.0
    # detail 10: the tiny model ends no response within 24 tokens, so every score is the no-EOS penalty (-1)
    assert first["ended"] == 0.0 and first["reward"] == -1.0


def test_reference_is_never_stepped_and_dropout_is_off(pipeline):
    dirs, _ = pipeline
    final = records(os.path.join(dirs["ppo"], "metrics.jsonl"))[-1]
    assert final["reference_unchanged"] is True
    assert final["dropout_off"] is True
    # the whole held-out table is in the log, not only on the console (study.py's JSON copies it)
    for name in ("sft", "ppo"):
        assert 0 <= final[f"eval_distinct2_{name}"] <= 1 and 0 <= final[f"eval_ended_{name}"] <= 1
        assert 0 <= final[f"eval_rm_gold_acc_{name}"] <= 1 and final[f"eval_length_{name}"] >= 0


def test_resume_continues(pipeline, tmp_path):
    dirs, _ = pipeline
    out = str(tmp_path / "ppo")
    first = run_ppo(dirs, out, "--iterations", "2", "--save_every", "1", "--adaptive_kl", "False")
    assert first.returncode == 0, first.stderr[-3000:]
    # resumed with an adaptive controller and a new target: beta carries over, the settings are the new ones
    second = run_ppo(dirs, out, "--iterations", "4", "--resume", "--target_kl", "0.5", "--kl_horizon", "100")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout and "iteration 2" in second.stdout
    logged = [r for r in records(os.path.join(out, "metrics.jsonl")) if "reward" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    kl_ctl = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["kl_ctl"]
    assert kl_ctl["target"] == 0.5 and kl_ctl["horizon"] == 100
    assert logged[2]["kl_coef"] == logged[1]["kl_coef"]  # fixed before the stop: iteration 3 starts from it


def test_log_every_thins_the_log_but_keeps_the_last_iteration(pipeline, tmp_path):
    dirs, _ = pipeline
    out = str(tmp_path / "ppo")
    result = run_ppo(dirs, out, "--iterations", "3", "--log_every", "2", "--eval_prompts", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in records(os.path.join(out, "metrics.jsonl")) if "reward" in r] == [2, 3]


def test_missing_rm_for_a_given_tokenizer_is_refused(pipeline, tmp_path):
    # an RM trained on another tokenizer cannot score this policy's tokens
    dirs, _ = pipeline
    other_sft, other_rm = str(tmp_path / "sft2"), str(tmp_path / "rm2")
    assert run("train_sft.py", "--preset", "tiny", "--vocab_size", "400", "--out_dir", other_sft).returncode == 0
    assert run("train_rm.py", "--preset", "tiny", "--sft_dir", other_sft, "--out_dir", other_rm).returncode == 0
    result = run("train_ppo.py", "--preset", "tiny", "--sft_dir", dirs["sft"], "--rm_dir", other_rm,
                 "--out_dir", str(tmp_path / "ppo"))
    assert result.returncode != 0
    assert "another tokenizer" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_rollouts_and_training_keep_the_logprobs_aligned(pipeline, tmp_path):
    """--compile: training forwards compiled, and the rollout's decode step compiled (a CUDA graph on GPU)
    over prompts padded to a fixed width. The sampler's logprobs must still equal the teacher-forced
    pass (detail 4), and the first minibatch must still reproduce the old logprobs (detail 3)."""
    dirs, _ = pipeline
    out = str(tmp_path / "ppo")
    result = run_ppo(dirs, out, "--iterations", "2", "--temperature", "0.7", "--compile")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "torch.compile failed" not in result.stdout  # the compiled step ran, not its eager fallback
    steps = [r for r in records(os.path.join(out, "metrics.jsonl")) if "reward" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["first_ratio"] == 1.0 and r["first_approx_kl"] == 0.0
        assert r["logprob_gap"] < 1e-4
