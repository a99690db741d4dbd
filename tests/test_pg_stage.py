"""Subprocess runs on the tiny preset: train_pg.py for each algorithm (first-minibatch ratio exactly 1, the
logged metrics, the held-out evaluation with the alignment tax, resume), and train_ppo.py --ptx_coef (PPO-ptx)."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 72 new tokens: the tiny model ends some responses, so the rewards (and the advantages) differ
LONG = ("--max_new_tokens", "72")


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg")
    dirs = {k: str(root / k) for k in ("sft", "rm")}
    assert run("train_sft.py", "--preset", "tiny", "--out_dir", dirs["sft"]).returncode == 0
    result = run("train_rm.py", "--preset", "tiny", "--sft_dir", dirs["sft"], "--out_dir", dirs["rm"])
    assert result.returncode == 0, result.stderr[-3000:]
    return dirs


def run_pg(stages, out, *args):
    return run("train_pg.py", "--preset", "tiny", "--sft_dir", stages["sft"], "--rm_dir", stages["rm"], "--out_dir",
               out, *LONG, *args)


@pytest.mark.parametrize("algo", ["reinforce", "rloo", "grpo", "drgrpo"])
def test_each_algorithm_trains_and_evaluates(stages, tmp_path, algo):
    out = str(tmp_path / algo)
    result = run_pg(stages, out, "--algo", algo, "--iterations", "3", "--temperature", "0.7")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    logged = records(os.path.join(out, "metrics.jsonl"))
    steps = [r for r in logged if "reward" in r]
    assert len(steps) == 3
    for r in steps:  # detail 3 and 4: the first minibatch reproduces the old logprobs; the sampler's agree
        assert r["first_ratio"] == 1.0 and r["first_approx_kl"] == 0.0 and r["logprob_gap"] < 1e-4
        for key in ("gold", "kl", "resp_len", "ended", "distinct2", "entropy", "clipfrac", "adv_std"):
            assert key in r
        assert "value_loss" not in r and "explained_var" not in r  # no value model
        assert ("kl_loss" in r) == (algo in ("grpo", "drgrpo"))  # the KL term of the loss
    assert steps[0]["kl"] == 0.0  # before any update the policy is the reference
    assert any(r["adv_std"] > 0 for r in steps) and any(r["approx_kl"] > 0 for r in steps)  # it learned something
    final = logged[-1]
    name = algo
    assert final[f"eval_lm_loss_{name}"] > 0 and final["eval_lm_loss_sft"] > 0  # the alignment tax, beside SFT's
    assert 0 <= final["eval_win_rate"] <= 1 and f"eval_gold_{name}" in final
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["stage"] == "pg" and ckpt["step"] == 3 and "value_model" not in ckpt


def test_resume_continues_with_the_baseline(stages, tmp_path):
    out = str(tmp_path / "reinforce")
    first = run_pg(stages, out, "--algo", "reinforce", "--iterations", "2", "--save_every", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    baseline = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["baseline"]["value"]
    assert baseline is not None
    second = run_pg(stages, out, "--algo", "reinforce", "--iterations", "3", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout
    assert [r["step"] for r in records(os.path.join(out, "metrics.jsonl")) if "reward" in r] == [1, 2, 3]


def test_bad_group_settings_are_refused_with_the_fix(stages, tmp_path):
    result = run_pg(stages, str(tmp_path / "x"), "--algo", "rloo", "--group_size", "3")
    assert result.returncode != 0 and "multiple of group_size" in result.stderr and "Traceback" not in result.stderr
    result = run_pg(stages, str(tmp_path / "x"), "--algo", "grpo", "--kl_estimator", "k4")
    assert result.returncode != 0 and "k1 | k2 | k3" in result.stderr


def test_ptx_coef_adds_the_lm_loss_and_zero_changes_nothing(stages, tmp_path):
    """PPO-ptx: --ptx_coef 0 (the default) gives exactly the metrics of a run without the flag; > 0 logs the LM
    loss and trains a different policy."""
    def ppo(out, *args):
        result = run("train_ppo.py", "--preset", "tiny", "--sft_dir", stages["sft"], "--rm_dir", stages["rm"],
                     "--out_dir", str(tmp_path / out), *LONG, "--iterations", "2", "--eval_prompts", "4", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        timeless = [{k: v for k, v in r.items() if not k.startswith("t_")}
                    for r in records(str(tmp_path / out / "metrics.jsonl"))]
        return timeless, torch.load(str(tmp_path / out / "ckpt.pt"), weights_only=True)

    plain, plain_ckpt = ppo("plain")
    zero, zero_ckpt = ppo("zero", "--ptx_coef", "0")
    ptx, ptx_ckpt = ppo("ptx", "--ptx_coef", "1.0")
    assert plain == zero and all(torch.equal(a, b) for a, b in zip(plain_ckpt["model"].values(),
                                                                   zero_ckpt["model"].values()))
    steps = [r for r in ptx if "reward" in r]
    assert "ptx_loss" not in plain[0] and all(r["ptx_loss"] > 0 for r in steps)
    assert steps[0]["first_ratio"] == 1.0  # the PPO terms are as before on the first minibatch
    assert not all(torch.equal(a, b) for a, b in zip(plain_ckpt["model"].values(), ptx_ckpt["model"].values()))


def test_frontier_runs_each_method_then_reuses_the_runs(stages, tmp_path):
    out = str(tmp_path / "frontier")
    args = ("study.py", "frontier", "--preset", "tiny", "--sft_dir", stages["sft"], "--rm_dir", stages["rm"],
            "--out_dir", out, *LONG, "--methods", "rloo,grpo,dpo,bon", "--bon", "1,2", "--parallel", "2")
    result = run(*args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(os.path.join(out, "frontier.json")) as f:
        points = json.load(f)["points"]
    assert [(p["method"], p["value"]) for p in points] == [("sft", 0), ("rloo", 0.1), ("grpo", 0.1), ("dpo", 0.1),
                                                           ("bon", 1), ("bon", 2)]
    sft, bon1 = points[0], points[4]
    # best-of-1 draws exactly the SFT samples (the same draws): the same gold, win rate 1/2, KL 0, no tax
    assert bon1["gold"] == sft["gold"] and bon1["win_rate"] == 0.5 and bon1["kl"] == 0.0
    for p in points:
        assert {"gold", "kl", "alignment_tax", "length", "distinct2", "wall_s", "win_rate"} <= set(p)
    assert all(p["wall_s"] > 0 for p in points[1:4])
    # every point was also judged on training prompts, where each method's strength is chosen
    assert all(isinstance(p["select_gold"], float) for p in points) and points[0]["select_gold"] != sft["gold"]
    with open(os.path.join(out, "frontier.json")) as f:
        assert [c["method"] for c in json.load(f)["chosen"]] == ["rloo", "grpo", "dpo", "bon"]
    assert os.path.exists(os.path.join(out, "frontier.png")) and os.path.exists(os.path.join(out, "frontier.md"))
    again = run(*args)
    assert again.returncode == 0 and again.stdout.count("reusing") == 3


def test_frontier_chooses_each_strength_on_the_selection_prompts_not_the_held_out_ones():
    """chosen(): per method the point with the highest gold on the selection prompts, whatever its held-out gold;
    and the selection prompts are training prompts, none of them a held-out one."""
    from nanorlhf.data import load_prompts, selection_prompts
    from nanorlhf.frontier import chosen
    pts = [{"method": "sft", "value": 0, "gold": 0.0, "select_gold": 0.0}]
    pts += [{"method": m, "value": v, "gold": g, "select_gold": s} for m, v, g, s in
            [("ppo", 0.03, 0.3, 0.1), ("ppo", 0.1, 0.1, 0.2), ("ppo", 0.3, -0.1, 0.15), ("bon", 4, 0.0, -0.2),
             ("bon", 16, 0.1, 0.05)]]
    assert [(p["method"], p["value"]) for p in chosen(pts)] == [("ppo", 0.1), ("bon", 16)]
    assert chosen([{**p, "select_gold": None} for p in pts]) == []  # no selection prompts: no choice
    train, held_out = load_prompts("sample", 128)
    select = selection_prompts("sample", 128)
    assert len(select) == 128 and set(select) <= set(train) and not set(select) & set(held_out)
    assert len(set(select)) > 80 and select[-1] not in train[:128]  # spread over the training stories
