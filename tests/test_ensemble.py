"""Reward-model ensembles (issue 22): conservative rewards against loops, the monitors' threshold logic on
hand-made series, and tiny-preset subprocess runs of train_rm.py --ensemble, train_ppo.py with an ensemble
reward, --stop_on_monitor, and study.py guard."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nanorlhf.checkpoint import load_checkpoint
from nanorlhf.ensemble import aggregate, bootstrap_groups, disagreement, distinct2, load_ensemble
from nanorlhf.monitors import MONITORS, Monitors, first_warning, parse_thresholds
from tests.test_smoke import check_ok, run


# ---------------------------------------------------------------- conservative rewards against loops
def test_conservative_rewards_match_loops():
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    lam = 0.7
    for b in range(7):
        xs = [float(scores[k, b]) for k in range(3)]
        mean = sum(xs) / 3
        std = (sum((x - mean) ** 2 for x in xs) / 3) ** 0.5  # over the members, ddof 0 (Coste et al.)
        assert float(aggregate(scores, "mean")[b]) == pytest.approx(mean, abs=1e-6)
        assert float(aggregate(scores, "mean_std", lam)[b]) == pytest.approx(mean - lam * std, abs=1e-6)
        assert float(aggregate(scores, "min")[b]) == pytest.approx(min(xs), abs=1e-6)
    stds = []
    for b in range(7):
        m = float(scores[:, b].mean())
        stds.append((sum((float(scores[k, b]) - m) ** 2 for k in range(3)) / 3) ** 0.5)
    assert float(disagreement(scores)) == pytest.approx(sum(stds) / 7, abs=1e-6)
    with pytest.raises(ValueError, match="mean, mean_std, min"):
        aggregate(scores, "median")


def test_distinct2_and_bootstrap():
    assert distinct2("a b a b a b") == pytest.approx(2 / 5)  # bigrams ab ba ab ba ab: 2 distinct of 5
    assert distinct2("one") == 1.0 and distinct2("the cat sat") == 1.0
    groups = [[i] for i in range(50)]
    a, b = bootstrap_groups(groups, 0), bootstrap_groups(groups, 1000)
    assert len(a) == 50 and a != b and len({g[0] for g in a}) < 50  # with replacement: some drawn twice


# ---------------------------------------------------------------- the monitors' threshold logic
def test_first_warning_after_patience_consecutive_values():
    series = [1.0, 1.6, 1.2, 1.6, 1.7, 1.8, 1.9]  # past 1.5 at 1, then 3, 4, 5 in a row
    assert first_warning(series, 1.5, "above", 3) == 5  # the third in a row, not before
    assert first_warning(series, 1.5, "above", 1) == 1
    assert first_warning(series, 1.5, "above", 5) is None
    assert first_warning([1.0] * 20, 1.5, "above", 3) is None  # flat: never
    assert first_warning([1.0, 0.8, 0.7, 0.95, 0.6, 0.5], 0.9, "below", 2) == 2
    assert first_warning([2.0, None, 2.0, 2.0, float("nan"), 2.0], 1.5, "above", 3) is None  # gaps break a streak


def test_monitors_warn_once_at_the_right_iteration():
    cal = {"scores": torch.tensor([[0.0, 0.1, -0.1, 0.2], [0.1, -0.1, 0.0, 0.3]]), "length": 10.0, "distinct2": 1.0}
    mon = Monitors(cal, "mean", 1.0, patience=2)
    base = float(disagreement(cal["scores"]))
    warned_at = {}
    for it in range(1, 8):
        spread = 1.0 if it < 4 else 3.0  # disagreement jumps to 3x its SFT value from iteration 4
        scores = torch.tensor([[0.0, 0.1], [0.0 + spread * 0.1, 0.1 - spread * 0.1]])
        values, warned = mon.observe(it, scores, scores.mean(0), np.array([10.0, 10.0]), ["a b c", "d e f"])
        for name in warned:
            assert name not in warned_at  # once each
            warned_at[name] = it
        if it == 1:
            assert values["length_ratio"] == 1.0 and values["distinct2_ratio"] == 1.0
            assert values["disagreement_ratio"] == pytest.approx(float(disagreement(scores)) / base)
    assert warned_at == {"disagreement_ratio": 5}  # past 1.5 at iterations 4 and 5: patience 2
    assert not mon.clear()
    quiet = Monitors(cal, "", 1.0, patience=2)
    for it in range(1, 10):  # a flat series: no warning
        _, warned = quiet.observe(it, cal["scores"][:1, :2], cal["scores"][0, :2], np.array([10.0, 11.0]),
                                  ["a b c", "d e f"])
        assert warned == []
    assert quiet.clear()


def test_threshold_flag_is_parsed_and_checked():
    assert parse_thresholds("disagreement_ratio=2, length_ratio=1.3") == {"disagreement_ratio": 2.0,
                                                                          "length_ratio": 1.3}
    assert parse_thresholds("") == {}
    for bad in ("disagreement=2", "length_ratio=nan", "length_ratio=inf", "length_ratio=", "length_ratio"):
        with pytest.raises(ValueError, match="disagreement_ratio"):  # the message names the monitors
            parse_thresholds(bad)
    assert set(MONITORS) == {"disagreement_ratio", "frac_above_sft_q99", "length_ratio", "distinct2_ratio"}


@pytest.mark.parametrize("cls,stage,flags,named", [
    ("RMConfig", "rm", {"ensemble": 0}, "ensemble"), ("RMConfig", "rm", {"ensemble": -2}, "ensemble"),
    ("RMConfig", "rm", {"member": -1}, "member"), ("StudyConfig", "study", {"ensemble": 1}, "ensemble"),
    ("PPOConfig", "ppo", {"monitor_patience": 0}, "monitor_patience"),
    ("PGConfig", "pg", {"monitor_patience": -1}, "monitor_patience"),
    ("PPOConfig", "ppo", {"ensemble_lambda": -0.5}, "ensemble_lambda"),
    ("PGConfig", "pg", {"reward_ensemble": "median"}, "reward_ensemble"),
    ("PPOConfig", "ppo", {"reward_ensemble": "Min"}, "reward_ensemble"),
    ("PGConfig", "pg", {"monitor_thresholds": "distinct2_ratio=nan"}, "monitor_thresholds"),
    ("PPOConfig", "ppo", {"monitor_thresholds": "kl=3"}, "monitor_thresholds")])
def test_ensemble_flags_that_cannot_work_are_refused_with_the_config(cls, stage, flags, named):
    """Refused by make_config, before any stage is trained: a message that names the flag."""
    from nanorlhf import config
    with pytest.raises(ValueError, match=named):
        config.make_config(getattr(config, cls), stage, **flags)


def test_ensemble_flags_that_can_work_are_accepted():
    from nanorlhf.config import PGConfig, PPOConfig, RMConfig, StudyConfig, make_config
    for how in ("", "mean", "mean_std", "min"):
        assert make_config(PGConfig, "pg", reward_ensemble=how, ensemble_lambda=0.0).reward_ensemble == how
    ppo = make_config(PPOConfig, "ppo", monitor_patience=1, monitor_thresholds="length_ratio=1.5")
    assert ppo.monitor_patience == 1
    assert make_config(RMConfig, "rm", ensemble=1).ensemble == 1 and make_config(StudyConfig, "study",
                                                                                   ensemble=2).ensemble == 2


def test_resumed_monitors_warn_when_one_unbroken_run_would():
    """Monitors.state_dict goes into the RL checkpoints: a run stopped and resumed mid-streak warns at the same
    iteration as a run that never stopped, and does not warn twice for one monitor."""
    cal = {"length": 10.0, "distinct2": 1.0}
    lengths = [10] + [13] * 10  # length_ratio 1.3 > 1.2 from iteration 2 on: warns at 4 (patience 3)
    texts = ["a b c d"] * 4

    def feed(mon, its):
        return [it for it in its if mon.observe(it, torch.zeros(1, 4), torch.zeros(4), np.full(4, lengths[it - 1]),
                                                texts)[1]]
    whole = Monitors(cal, "", 1.0, 3)
    assert feed(whole, range(1, 8)) == [4]
    first = Monitors(cal, "", 1.0, 3)
    assert feed(first, range(1, 4)) == []  # stopped at iteration 3, two iterations into the streak
    resumed = Monitors(cal, "", 1.0, 3)
    resumed.load_state_dict(torch.load(_roundtrip(first.state_dict()), weights_only=True))
    assert feed(resumed, range(4, 8)) == [4]
    fresh = Monitors(cal, "", 1.0, 3)  # without the saved state the warning would come late
    assert feed(fresh, range(4, 8)) == [6]
    again = Monitors(cal, "", 1.0, 3)
    again.load_state_dict(whole.state_dict())
    assert feed(again, range(8, 12)) == []  # warned once already


def test_resumed_monitors_with_a_smaller_patience_or_tighter_threshold_warn_at_once():
    """The saved series already holds a streak that the new setting counts: the first iteration after the
    resume warns (a check for "the streak ends at the last value" would never warn)."""
    cal = {"length": 10.0, "distinct2": 1.0}

    def step(mon, it, length):
        return mon.observe(it, torch.zeros(1, 4), torch.zeros(4), np.full(4, length), ["a b c d"] * 4)[1]
    saved = Monitors(cal, "", 1.0, 3)
    assert step(saved, 1, 13) == [] and step(saved, 2, 13) == []  # 1.3 > 1.2 twice: patience 3 not reached
    shorter = Monitors(cal, "", 1.0, 1)
    shorter.load_state_dict(saved.state_dict())
    assert step(shorter, 3, 10) == ["length_ratio"]  # this iteration is below, yet the streak of 2 counts
    quiet = Monitors(cal, "", 1.0, 3)
    for it in (1, 2, 3):
        step(quiet, it, 11.5)  # 1.15: under the default 1.2
    tight = Monitors(cal, "", 1.0, 3, {"length_ratio": 1.1})
    tight.load_state_dict(quiet.state_dict())
    assert step(tight, 4, 11.5) == ["length_ratio"]


def test_monitors_resumed_from_a_stopped_run_drop_what_came_after_its_step():
    cal = {"length": 10.0, "distinct2": 1.0}
    mon = Monitors(cal, "", 1.0, 2)
    for it in range(1, 5):
        mon.observe(it, torch.zeros(1, 4), torch.zeros(4), np.full(4, 10 if it < 3 else 13), ["a b c d"] * 4)
    assert mon.warned == {"length_ratio": 4}
    back = Monitors(cal, "", 1.0, 2)
    back.load_state_dict(mon.state_dict(), upto=2)  # --stop_on_monitor kept the policy after 2 updates
    assert len(back.series["length_ratio"]) == 2 and back.warned == {}
    back.load_state_dict(mon.state_dict(), upto=4)
    assert len(back.series["length_ratio"]) == 4 and back.warned == {"length_ratio": 4}


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ---------------------------------------------------------------- tiny-preset runs
@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    check_ok(run("train_sft.py", "--preset", "tiny", "--out_dir", out))
    return out


@pytest.fixture(scope="module")
def ensemble_dir(sft_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm_ens"))
    result = run("train_rm.py", "--preset", "tiny", "--sft_dir", sft_dir, "--out_dir", out, "--ensemble", "2",
                 timeout=600)
    check_ok(result)
    assert "ensemble of 2 reward models" in result.stdout
    return out


def test_ensemble_members_differ_and_share_the_pairs(ensemble_dir):
    m0, m1 = load_checkpoint(ensemble_dir, "rm"), load_checkpoint(os.path.join(ensemble_dir, "member_1"), "rm")
    assert m0["config"]["seed"] != m1["config"]["seed"]
    assert m0["prefs_digest"] == m1["prefs_digest"] and m0["val_groups"] == m1["val_groups"]
    assert not torch.equal(m0["model"]["head.weight"], m1["model"]["head.weight"])
    assert any(not torch.equal(m0["model"][k], m1["model"][k]) for k in m0["model"] if k.startswith("gpt."))
    members, cal = load_ensemble(ensemble_dir, "cpu")
    assert len(members) == 2 and cal["scores"].shape == (2, m0["config"]["norm_samples"])
    assert not torch.allclose(cal["scores"][0], cal["scores"][1])  # different scores of the same samples
    # member 0's scores there are its own normalisation samples: mean 0, std 1
    assert float(cal["scores"][0].mean()) == pytest.approx(0.0, abs=1e-4)


def test_an_ensemble_with_a_missing_member_is_refused(ensemble_dir, tmp_path):
    broken = str(tmp_path / "rm")
    shutil.copytree(ensemble_dir, broken)
    shutil.rmtree(os.path.join(broken, "member_1"))
    from nanorlhf.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="member_1"):
        load_ensemble(broken, "cpu")


def test_an_ensemble_with_a_member_retrained_after_it_was_made_is_refused(ensemble_dir, tmp_path):
    from nanorlhf.checkpoint import CheckpointError
    stale = str(tmp_path / "rm")
    shutil.copytree(ensemble_dir, stale)
    made = os.path.getmtime(os.path.join(stale, "ensemble.pt"))
    member = os.path.join(stale, "member_1", "ckpt.pt")
    os.utime(member, (made + 60, made + 60))  # as if member 1 alone were trained again since
    with pytest.raises(CheckpointError, match="member 1 .* retrained"):
        load_ensemble(stale, "cpu")
    os.utime(member, (made - 60, made - 60))
    assert len(load_ensemble(stale, "cpu")[0]) == 2


def ppo_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_monitors(out_dir):
    """The iteration lines of a 2-iteration tiny run, each with every monitor of an ensemble, finite."""
    steps = [r for r in ppo_metrics(out_dir) if "gold" in r]
    assert len(steps) == 2
    for r in steps:
        for key in ("disagreement", "disagreement_ratio", "frac_above_sft_q99", "length_ratio", "distinct2_ratio"):
            assert np.isfinite(r[key]), key
    return steps


def test_ppo_with_an_ensemble_reward_logs_the_monitors(sft_dir, ensemble_dir, tmp_path):
    out = str(tmp_path / "ppo")
    result = run("train_ppo.py", "--preset", "tiny", "--sft_dir", sft_dir, "--rm_dir", ensemble_dir, "--out_dir", out,
                 "--reward_ensemble", "mean_std", "--ensemble_lambda", "0.5", timeout=600)
    check_ok(result)
    logged_monitors(out)
    assert any("eval_gold_ppo" in r for r in ppo_metrics(out))


def test_one_rm_ppo_is_unchanged_by_the_ensemble_beside_it(sft_dir, ensemble_dir, tmp_path):
    """PPO on member 0 alone (a copy of it with ensemble 1) and PPO on the ensemble folder without
    --reward_ensemble log the same training numbers: scoring the other members draws no random numbers."""
    lone = str(tmp_path / "lone")
    os.makedirs(lone)
    ckpt = torch.load(os.path.join(ensemble_dir, "ckpt.pt"), weights_only=True)
    ckpt["config"]["ensemble"] = 1
    torch.save(ckpt, os.path.join(lone, "ckpt.pt"))
    logs = []
    for name, rm_dir in (("a", lone), ("b", ensemble_dir)):
        check_ok(run("train_ppo.py", "--preset", "tiny", "--sft_dir", sft_dir, "--rm_dir", rm_dir, "--out_dir",
                     str(tmp_path / name), timeout=600))
        logs.append([r for r in ppo_metrics(str(tmp_path / name)) if "gold" in r])
    for a, b in zip(*logs):
        for key in ("reward", "gold", "kl", "entropy", "value_loss", "approx_kl", "length_ratio"):
            assert a[key] == b[key], key
    assert "disagreement" in logs[1][0] and "disagreement" not in logs[0][0]


def test_ppo_refuses_an_ensemble_reward_without_an_ensemble(sft_dir, ensemble_dir, tmp_path):
    lone = str(tmp_path / "lone")
    os.makedirs(lone)
    ckpt = torch.load(os.path.join(ensemble_dir, "ckpt.pt"), weights_only=True)
    ckpt["config"]["ensemble"] = 1
    torch.save(ckpt, os.path.join(lone, "ckpt.pt"))
    result = run("train_ppo.py", "--preset", "tiny", "--sft_dir", sft_dir, "--rm_dir", lone, "--out_dir",
                 str(tmp_path / "p"), "--reward_ensemble", "min")
    assert result.returncode != 0 and "train_rm.py --ensemble" in result.stderr


def test_ensemble_reward_without_a_reward_model_is_refused_before_any_stage_is_trained(tmp_path):
    """--reward_ensemble with no RM in --rm_dir: train_ppo.py (and train_pg.py) would otherwise train SFT and a
    lone RM first, then refuse it. Refused at once; nothing trained."""
    for script in ("train_ppo.py", "train_pg.py"):
        sft, rm = str(tmp_path / script / "sft"), str(tmp_path / script / "rm")
        result = run(script, "--preset", "tiny", "--sft_dir", sft, "--rm_dir", rm, "--out_dir",
                     str(tmp_path / script / "out"), "--reward_ensemble", "min")
        assert result.returncode != 0 and "train_rm.py --ensemble 3" in result.stderr, result.stderr[-500:]
        assert not os.path.exists(sft) and not os.path.exists(rm)


def test_critic_free_methods_use_the_ensemble_reward_and_log_the_monitors(sft_dir, ensemble_dir, tmp_path):
    """train_pg.py reads the same flags as PPO: the members' min as its reward, the monitors in each line."""
    out = str(tmp_path / "pg")
    result = run("train_pg.py", "--preset", "tiny", "--algo", "rloo", "--sft_dir", sft_dir, "--rm_dir", ensemble_dir,
                 "--out_dir", out, "--reward_ensemble", "min", timeout=600)
    check_ok(result)
    steps = logged_monitors(out)
    assert load_checkpoint(out, "pg")["monitors"]["series"]["length_ratio"] == [r["length_ratio"] for r in steps]


@pytest.mark.parametrize("script,stage", [("train_ppo.py", "ppo"), ("train_pg.py", "pg")])
def test_a_resumed_run_carries_its_monitors_series_on(sft_dir, ensemble_dir, tmp_path, script, stage):
    """The checkpoint holds the monitors' series; --resume continues them (a fresh series would restart at the
    resumed iteration, and a streak in progress would warn late)."""
    out = str(tmp_path / stage)
    common = ("--preset", "tiny", "--sft_dir", sft_dir, "--rm_dir", ensemble_dir, "--out_dir", out)
    check_ok(run(script, *common, "--iterations", "2", timeout=600))
    first = load_checkpoint(out, stage)["monitors"]["series"]["disagreement_ratio"]
    check_ok(run(script, *common, "--iterations", "3", "--resume", timeout=600))
    series = load_checkpoint(out, stage)["monitors"]["series"]["disagreement_ratio"]
    assert len(first) == 2 and len(series) == 3 and series[:2] == first


def test_stop_on_monitor_in_a_critic_free_method_keeps_the_last_clear_policy(sft_dir, ensemble_dir, tmp_path):
    out = str(tmp_path / "pg")
    result = run("train_pg.py", "--preset", "tiny", "--algo", "grpo", "--sft_dir", sft_dir, "--rm_dir", ensemble_dir,
                 "--out_dir", out, "--iterations", "4", "--stop_on_monitor", "true", "--monitor_patience", "2",
                 "--monitor_thresholds", "distinct2_ratio=2", timeout=600)
    check_ok(result)
    assert "MONITOR WARNING at iteration 2: distinct2_ratio" in result.stdout
    assert "stopped by --stop_on_monitor at iteration 2" in result.stdout
    assert [r["step"] for r in ppo_metrics(out) if "gold" in r] == [1, 2]
    ckpt, sft = load_checkpoint(out, "pg"), load_checkpoint(sft_dir, "sft")
    assert ckpt["step"] == 0 and all(torch.equal(ckpt["model"][k], sft["model"][k]) for k in sft["model"])
    assert [r["step"] for r in ppo_metrics(out) if "eval_gold_pg" in r or "eval_win_rate" in r] == [0]


def test_stop_on_monitor_keeps_the_last_clear_policy_and_exits_0(sft_dir, ensemble_dir, tmp_path):
    out = str(tmp_path / "ppo")
    # distinct-2 can never fall below a ratio of 2 ... it is always "past": the second iteration warns, and
    # no iteration was clear, so the policy kept is the one before any update: SFT's weights
    result = run("train_ppo.py", "--preset", "tiny", "--sft_dir", sft_dir, "--rm_dir", ensemble_dir, "--out_dir", out,
                 "--iterations", "4", "--stop_on_monitor", "true", "--monitor_patience", "2",
                 "--monitor_thresholds", "distinct2_ratio=2", timeout=600)
    check_ok(result)
    assert "MONITOR WARNING at iteration 2: distinct2_ratio" in result.stdout
    assert "stopped by --stop_on_monitor at iteration 2" in result.stdout
    steps = [r["step"] for r in ppo_metrics(out) if "gold" in r]
    assert steps == [1, 2]
    ckpt, sft = load_checkpoint(out, "ppo"), load_checkpoint(sft_dir, "sft")
    assert ckpt["step"] == 0
    assert all(torch.equal(ckpt["model"][k], sft["model"][k]) for k in sft["model"])
    assert any("eval_gold_ppo" in r for r in ppo_metrics(out))


def test_guard_study_at_tiny(sft_dir, tmp_path):
    out = str(tmp_path / "study")
    result = run("study.py", "guard", "--preset", "tiny", "--sft_dir", sft_dir, "--out_dir", out, "--rater_bias",
                 "length", "--iterations", "2", "--ensemble", "2", "--eval_prompts", "4", "--parallel", "2",
                 timeout=1200)
    check_ok(result)
    with open(os.path.join(out, "guard.json")) as f:
        report = json.load(f)["report"]
    assert set(report["length"]) == {"single", "mean", "mean_std", "min"}
    for c in list(report["length"].values()) + [report["unbiased_adaptive_beta"]]:
        assert c["iteration"] == [1, 2] and len(c["sqrt_kl"]) == 2 and set(c["warnings"]) == set(MONITORS)
        assert c["gold_peak"]["iteration"] in (1, 2)
    assert "false_alarms" in report["unbiased_adaptive_beta"]
    assert os.path.exists(os.path.join(out, "guard.png"))


def test_ppo_reward_is_member_0s_unless_an_ensemble_reward_is_asked_for():
    from types import SimpleNamespace
    from nanorlhf.monitors import ensemble_reward
    from nanorlhf.ppo_step import score_responses
    from tests.conftest import left_padded, make_scalar_gpt
    rt = SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False))
    members = [(make_scalar_gpt(seed=s), 1.0 + s, 0.1 * s) for s in range(3)]
    prompt, prompt_mask = left_padded([3, 5, 2, 4], 23, seed=1)
    response = torch.randint(0, 22, (4, 6), generator=torch.Generator().manual_seed(2))
    response[:3, 3] = 22  # rows 0-2 end with the end token at column 3; row 3 never ends
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3 + [[1] * 6])
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "response": response, "mask": mask}
    scores, ended, raw = score_responses(members[0][0], 1.0, 0.0, batch, 22, -1.0, rt, raw=True)
    assert ended.tolist() == [True, True, True, False]
    assert torch.equal(scores, torch.where(ended, raw, torch.tensor(-1.0)))  # raw: before the no-EOS penalty
    single, all_scores = ensemble_reward(members, batch, scores, ended,
                                         SimpleNamespace(reward_ensemble="", ensemble_lambda=1.0), rt, raw)
    assert torch.equal(single, scores) and all_scores.shape == (3, 4)
    # member 0 passed in (the RL stages' way) equals every member scored afresh, member 0 included
    from nanorlhf.ensemble import member_scores
    assert torch.allclose(all_scores, member_scores(members, batch, rt), atol=1e-6)
    for how in ("mean", "mean_std", "min"):
        r, _ = ensemble_reward(members, batch, scores, ended, SimpleNamespace(reward_ensemble=how, ensemble_lambda=0.5),
                               rt, raw)
        assert torch.allclose(r[:3], aggregate(all_scores, how, 0.5)[:3]) and float(r[3]) == -1.0
    lone, lone_all = ensemble_reward(members[:1], batch, scores, ended,
                                     SimpleNamespace(reward_ensemble="", ensemble_lambda=1.0), rt, raw)
    assert torch.equal(lone, scores) and torch.equal(lone_all, scores[None])


def test_the_guard_study_reuses_the_preference_pairs_of_the_overoptimization_rm_only_when_they_match(tmp_path):
    """An ensemble learns from out_dir/rm_<bias>/prefs.jsonl when that RM finished with the very flags the
    overoptimization study gives it (its record, as run_stages writes it); other flags (a bias weight, a common
    flag), an unfinished RM or none: its own pairs."""
    import json
    from types import SimpleNamespace
    from nanorlhf import studies
    from nanorlhf.checkpoint import save_checkpoint
    from nanorlhf.ensemble_study import prefs_of
    cfg = SimpleNamespace(out_dir=str(tmp_path))
    made = {"preset": "cpu", "max_new_tokens": 224, "sft_dir": str(tmp_path / "sft"), "rater_bias": "length",
            "rater_bias_weight": 0.2}
    rm = tmp_path / "rm_length"
    save_checkpoint(str(rm), {"stage": "rm", "model": {}, "model_config": {}, "step": 9, "tokenizer": {},
                              "config": made, "gain": 1.0, "bias": 0.0})
    (rm / studies.RECORD).write_text(json.dumps({"flags": {k: str(v) for k, v in made.items()}, "wall_s": 1}))
    assert prefs_of(cfg, "length", lambda bias: made) == ""  # no pairs beside it
    (rm / "prefs.jsonl").write_text("{}\n")
    assert prefs_of(cfg, "length", lambda bias: made) == str(rm / "prefs.jsonl")
    assert prefs_of(cfg, "length", lambda bias: {**made, "rater_bias_weight": 0.5}) == ""
    assert prefs_of(cfg, "length", lambda bias: {**made, "max_new_tokens": 96}) == ""  # a common flag differs
    assert prefs_of(cfg, "flowery", lambda bias: {**made, "rater_bias": bias}) == ""  # no rm_flowery
    save_checkpoint(str(rm), {"stage": "rm", "model": {}, "model_config": {}, "step": 9, "tokenizer": {},
                              "config": made})  # stopped before its normaliser
    assert prefs_of(cfg, "length", lambda bias: made) == ""
