"""The Goodhart-curve pieces of study.py overoptimization: the Gao et al. (2022) fits recover known
coefficients, best-of-n in disjoint blocks equals a plain loop, and the peak test against hand values."""
import math

import numpy as np
import pytest

from nanorlhf.config import StudyConfig, make_config
from nanorlhf.evaluate import (best_of_n_blocks, best_of_n_kl, fit_goodhart, goodhart_curve, goodhart_features,
                               peak_vs_final, running_mean)

D_RL = np.sqrt(np.linspace(0.0, 30.0, 40))  # PPO: sqrt(KL) from 0 to ~5.5 over the iterations
D_BON = np.sqrt([best_of_n_kl(2 ** k) for k in range(7)])  # n = 1 .. 64


def test_features_by_hand():
    # d = e: rl features (e, -e log e) = (e, -e); bon features (e, -e^2); d = 0 gives (0, 0), not nan
    assert goodhart_features("rl", [math.e, 0.0]).ravel() == pytest.approx([math.e, -math.e, 0.0, 0.0])
    assert goodhart_features("bon", [2.0, 0.0]).ravel() == pytest.approx([2.0, -4.0, 0.0, 0.0])
    assert goodhart_curve("rl", [1.0], 0.3, 5.0).tolist() == pytest.approx([0.3])  # log 1 = 0
    with pytest.raises(ValueError, match="rl | bon"):
        goodhart_features("linear", [1.0])


@pytest.mark.parametrize("form,d,alpha,beta", [("rl", D_RL, 0.31, 0.07), ("rl", D_RL, 0.2, 0.15),
                                               ("bon", D_BON, 0.5, 0.3), ("bon", D_BON, 0.12, 0.02)])
def test_fit_recovers_known_coefficients(form, d, alpha, beta):
    # noiseless points written out from the formula itself, not from goodhart_curve
    gain = d * (alpha - beta * (np.log(np.where(d > 0, d, 1.0)) if form == "rl" else d))
    fit = fit_goodhart(form, d, gain)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    # small noise: near them, R^2 high but below 1
    rng = np.random.default_rng(0)
    noisy = fit_goodhart(form, d, gain + rng.normal(0, 0.002, len(d)))
    assert noisy["alpha"] == pytest.approx(alpha, abs=0.03) and noisy["beta"] == pytest.approx(beta, abs=0.03)
    assert 0.9 < noisy["r2"] < 1.0


def test_a_wrong_form_fits_worse():
    # RL-shaped points fitted with the best-of-n form: not recovered, R^2 below 1 (a swapped feature shows)
    gain = goodhart_curve("rl", D_RL, 0.31, 0.07)
    wrong = fit_goodhart("bon", D_RL, gain)
    assert wrong["r2"] < 0.999 and abs(wrong["beta"] - 0.07) > 0.01


def test_fit_needs_two_points_away_from_zero():
    fit = fit_goodhart("bon", [0.0, 1.0], [0.0, 0.4])
    assert all(math.isnan(v) for v in fit.values())
    # the R^2 is the centred one: a flat line through the mean scores 0, one through 0 scores below
    d = np.array([1.0, 2.0, 3.0])
    assert fit_goodhart("bon", d, goodhart_curve("bon", d, 1.0, 0.1))["r2"] == pytest.approx(1.0)


def test_best_of_n_blocks_equal_a_loop():
    rng = np.random.default_rng(1)
    P, n_max = 5, 8
    rewards, gold = rng.normal(size=P * n_max), rng.normal(size=P * n_max)
    for n in (1, 2, 4, 8):
        expected = []
        for p in range(P):
            picked = []
            for b in range(n_max // n):  # the b-th block of n of prompt p's samples
                block = list(range(p * n_max + b * n, p * n_max + (b + 1) * n))
                best = max(block, key=lambda i: rewards[i])
                picked.append(gold[best])
            expected.append(sum(picked) / len(picked))
        assert best_of_n_blocks(rewards, gold, n_max, n) == pytest.approx(expected, abs=1e-12)
    # n = 1 keeps every sample; n = n_max is one pick per prompt
    assert best_of_n_blocks(rewards, gold, n_max, 1) == pytest.approx(gold.reshape(P, n_max).mean(1))
    with pytest.raises(ValueError, match="powers of 2"):
        best_of_n_blocks(rewards, gold, n_max, 3)


def test_peak_vs_final_by_hand():
    # windows of 2 over (0, 1, 3, 3, 1, 1): means 0.5, 2, 3, 2, 1 -> peak 3 (iterations 2-3), final 1
    x = [0.0, 1.0, 3.0, 3.0, 1.0, 1.0]
    r = peak_vs_final(x, 2, se=[0.1, 0.1, 0.3, 0.4, 0.0, 0.0])
    assert (r["peak"], r["final"], r["drop"], r["peak_end"]) == (3.0, 1.0, 2.0, 3)
    assert r["peak_se"] == pytest.approx(0.25) and r["final_se"] == 0.0  # sqrt(0.09 + 0.16) / 2
    assert r["z"] == pytest.approx(8.0) and r["se_from"] == "samples"
    # from the spread: windows (3, 3) and (1, 1) have none -> z nan
    assert math.isnan(peak_vs_final(x, 2)["z"])
    r = peak_vs_final([0.0, 1.0, 2.0, 3.0, 4.0], 3)  # still rising: the peak is the final window
    assert (r["peak"], r["final"], r["drop"], r["peak_end"]) == (3.0, 3.0, 0.0, 4) and r["z"] == 0.0
    r = peak_vs_final([5.0, 6.0, 7.0, 1.0, 2.0, 3.0], 3)
    # both windows have std 1: se 1 / sqrt(3) each, drop 4, z = 4 / sqrt(2 / 3)
    assert r["drop"] == 4.0 and r["z"] == pytest.approx(4 / math.sqrt(2 / 3)) and r["se_from"] == "spread"
    assert running_mean([1.0, 3.0, 5.0], 2).tolist() == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="at least window"):
        peak_vs_final([1.0], 2)


def test_study_refuses_a_best_of_n_that_is_not_a_power_of_2():
    for bad in (3, 48, -4):
        with pytest.raises(ValueError, match="bon_max must be 0 .* or a power of 2"):
            make_config(StudyConfig, "study", preset="tiny", bon_max=bad)
    with pytest.raises(ValueError, match="bon_prompts must be >= 1"):
        make_config(StudyConfig, "study", preset="tiny", bon_prompts=0)
    assert make_config(StudyConfig, "study", preset="tiny", bon_max=0).bon_max == 0  # no best-of-n
    assert make_config(StudyConfig, "study", preset="cpu").bon_max == 64


# ---------------------------------------------------------------- reusing a study's finished runs

def test_a_run_is_reused_only_with_its_record_flags_and_no_newer_upstream(tmp_path):
    """studies.run_stage records a run that exited 0 (flags, wall-clock); finished() reuses it only with the same
    flags and no upstream checkpoint newer than it; a failed rerun leaves no record behind."""
    import json
    import os
    from nanorlhf import studies
    from nanorlhf.checkpoint import save_checkpoint
    out, sft = tmp_path / "run", tmp_path / "sft"
    for d in (out, sft):
        save_checkpoint(str(d), {"stage": "dpo", "model": {}, "model_config": {}, "step": 1, "tokenizer": {},
                                 "config": {"lr": 0.1, "sft_dir": str(sft)}})
    os.utime(sft / "ckpt.pt", (1, 1))
    os.utime(out / "ckpt.pt", (2, 2))
    (out / studies.RECORD).write_text(json.dumps({"flags": {"lr": "0.1", "sft_dir": str(sft)}, "wall_s": 12.5}))
    assert studies.finished(str(out), {"lr": 0.1, "sft_dir": str(sft)})
    assert studies.stage_record(str(out))["wall_s"] == 12.5
    assert not studies.finished(str(out), {"lr": 0.2, "sft_dir": str(sft)})
    assert not studies.finished(str(out), {"lr": 0.1})  # a flag fewer is another run
    os.utime(out / studies.RECORD, (3, 3))
    os.utime(out / "ckpt.pt", (4, 4))  # its checkpoint written again after the record (a rerun stopped midway)
    assert not studies.finished(str(out), {"lr": 0.1, "sft_dir": str(sft)})
    os.utime(out / "ckpt.pt", (2, 2))
    os.utime(sft / "ckpt.pt")  # the SFT model was retrained after this run: stale
    assert not studies.finished(str(out), {"lr": 0.1, "sft_dir": str(sft)})
    with pytest.raises(SystemExit, match="no_such_script.py failed"):
        studies.run_stage("no_such_script.py", str(out), {"lr": 0.1})
    assert studies.stage_record(str(out)) is None  # the earlier run it described is being replaced


def test_a_study_continues_a_stopped_run_with_resume_and_starts_others_over(tmp_path):
    """A stage stopped before its end (an RM without its normaliser, no record) is continued with --resume when
    its checkpoint holds the whole config the stage's flags build; other flags, a changed preset value, a run
    that failed, a record, a newer upstream or an ensemble start over."""
    import dataclasses
    import os
    from nanorlhf import studies
    from nanorlhf.checkpoint import save_checkpoint
    from nanorlhf.config import RMConfig, make_config
    out, sft = tmp_path / "rm", tmp_path / "sft"
    save_checkpoint(str(sft), {"stage": "sft", "model": {}, "model_config": {}, "step": 1, "tokenizer": {},
                               "config": {}})
    flags = {"preset": "tiny", "sft_dir": str(sft), "lr": 0.1}

    def stopped_rm(**changed):  # the checkpoint a stopped train_rm.py leaves: no "gain"
        config = {**dataclasses.asdict(make_config(RMConfig, "rm", **flags)), **changed}
        save_checkpoint(str(out), {"stage": "rm", "model": {}, "model_config": {}, "step": 46, "tokenizer": {},
                                   "config": config})
    stopped_rm()
    os.utime(sft / "ckpt.pt", (1, 1))
    assert not studies.finished(str(out), flags) and studies.interrupted("train_rm.py", str(out), flags)
    assert not studies.interrupted("train_rm.py", str(out), {**flags, "lr": 0.2})  # another run: start over
    assert not studies.interrupted("train_rm.py", str(tmp_path / "nothing"), flags)
    assert not studies.interrupted("no_such_script.py", str(out), flags)
    stopped_rm(n_prompts=33)  # made when the preset said 33 prompts: the same flags build another run now
    assert not studies.interrupted("train_rm.py", str(out), flags)
    stopped_rm()
    with pytest.raises(SystemExit, match="--resume True"):  # run_stages continued it (and it fails: no real SFT)
        studies.run_stage("train_rm.py", str(out), flags)
    assert os.path.exists(out / studies.FAILED)  # a run that failed is not continued by the next study
    assert not studies.interrupted("train_rm.py", str(out), flags)
    with pytest.raises(SystemExit) as e:
        studies.run_stage("train_rm.py", str(out), flags)
    assert "--resume" not in str(e.value)
    (out / studies.FAILED).unlink()
    os.utime(sft / "ckpt.pt")  # the SFT model retrained after the stop: the stopped run is stale
    assert not studies.interrupted("train_rm.py", str(out), flags)
    os.utime(sft / "ckpt.pt", (1, 1))
    (out / studies.RECORD).write_text('{"flags": {}, "wall_s": 1}')  # finished once, with other flags
    assert not studies.interrupted("train_rm.py", str(out), flags)
    (out / studies.RECORD).unlink()
    stopped_rm(ensemble=3)
    assert not studies.interrupted("train_rm.py", str(out), {**flags, "ensemble": 3})  # members are runs of their own
