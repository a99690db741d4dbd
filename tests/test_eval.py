"""eval.py and study.py: the evaluation pieces against hand-computed values, best-of-n against a
loop and its analytic KL against an exact sum, then subprocess smoke runs on tiny checkpoints
(one SFT -> RM -> PPO run shared by the module), including the iterated-RLHF hooks."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanorlhf.evaluate import best_of_n_kl, best_of_n_pick, distinct_n, mean_se, pairwise_agreement, win_rate
from nanorlhf.judge import gold_scores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread beats two contended ones
TINY = ("--preset", "tiny", "--device", "cpu")


def run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- the pieces, by hand

def test_win_rate_counts_ties_as_half():
    a, b = [1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]  # win, loss, tie, win -> 1, 0, 1/2, 1
    m, se = win_rate(a, b)
    assert m == pytest.approx(2.5 / 4)
    # sample variance of (1, 0, .5, 1) about .625: (.140625 + .390625 + .015625 + .140625) / 3
    assert se == pytest.approx(math.sqrt(0.6875 / 3) / 2)
    assert mean_se([2.0, 4.0]) == pytest.approx((3.0, 1.0))


def test_best_of_n_picks_the_argmax_of_each_prompt():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=5 * 4)  # 5 prompts, 4 samples each, side by side
    expected = []
    for p in range(5):
        group = list(rewards[p * 4:(p + 1) * 4])
        expected.append(p * 4 + group.index(max(group)))
    assert best_of_n_pick(rewards, 4).tolist() == expected
    assert best_of_n_pick([0.1, 0.9, 0.3, 2.0, 1.0, -1.0], 3).tolist() == [1, 3]
    with pytest.raises(ValueError, match="multiple of n"):
        best_of_n_pick([1.0, 2.0, 3.0], 2)


def test_best_of_n_kl_analytic_value_and_exact_sum():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 3 / 4)  # 0.6363
    # exact KL of best-of-4 over m equally likely responses with distinct rewards: the i-th worst is
    # kept with probability (i/m)^4 - ((i-1)/m)^4; as m grows the sum tends to log n - (n-1)/n
    m = 20_000
    i = np.arange(1, m + 1)
    p = (i / m) ** 4 - ((i - 1) / m) ** 4
    assert float(np.sum(p * np.log(p * m))) == pytest.approx(best_of_n_kl(4), abs=1e-3)


def test_distinct_2_on_crafted_texts():
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 3 distinct of 5
    assert distinct_n(["a b a b", "a b c"]) == pytest.approx(3 / 5)
    assert distinct_n(["one", ""]) == 0.0  # no bigrams at all


def test_rm_gold_pairwise_agreement():
    assert pairwise_agreement([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)  # the last pair is swapped
    assert pairwise_agreement([1, 1, 3], [1, 2, 3]) == pytest.approx(2.5 / 3)  # an RM tie counts 1/2
    assert pairwise_agreement([1, 2, 3], [1, 1, 0]) == pytest.approx(0.0)  # gold's tie (0, 1) is left out


# ---------------------------------------------------------------- the scripts, on tiny checkpoints

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    d = {k: str(out / k) for k in ("sft", "rm", "ppo")}
    run("train_sft.py", *TINY, "--out_dir", d["sft"])
    run("train_rm.py", *TINY, "--sft_dir", d["sft"], "--out_dir", d["rm"], "--n_prompts", "24",
        "--norm_samples", "8", "--eval_samples", "8")
    run("train_ppo.py", *TINY, "--sft_dir", d["sft"], "--rm_dir", d["rm"], "--out_dir", d["ppo"])
    d["root"] = str(out)
    return d


def test_eval_writes_ranked_table_of_every_method(runs):
    out = os.path.join(runs["root"], "eval_out")
    missing = os.path.join(runs["root"], "no_such_run")
    proc = run("eval.py", *TINY, "--sft_dir", runs["sft"], "--rm_dir", runs["rm"], "--out_dir", out,
               "--ckpts", f"{runs['sft']},{runs['ppo']},{missing}", "--bon", "1,2", "--n_prompts", "8")
    assert "skipping" in proc.stdout and missing in proc.stdout
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"sft", "ppo", "best-of-1", "best-of-2"}
    assert results["skipped"] == [missing]
    golds = [r["gold"][0] for r in results["rows"]]
    assert golds == sorted(golds, reverse=True) and [r["rank"] for r in results["rows"]] == [1, 2, 3, 4]
    # best-of-1 draws the SFT samples themselves (same seed): the same gold, ties only against SFT
    assert rows["best-of-1"]["gold"] == rows["sft"]["gold"] and rows["best-of-1"]["win_rate"][0] == 0.5
    assert rows["best-of-2"]["kl"][0] == pytest.approx(math.log(2) - 0.5) and rows["best-of-2"]["kl_analytic"]
    assert rows["sft"]["kl"][0] == 0.0 and "win_rate" not in rows["sft"]
    for key in ("reward", "kl", "win_rate", "length", "distinct2", "rm_gold_acc"):
        assert key in rows["ppo"], key
    # train_ppo.py's held-out evaluation (8 prompts in the tiny preset) uses the same prompts and draws
    ppo_eval = read_jsonl(os.path.join(runs["ppo"], "metrics.jsonl"))[-1]
    assert rows["ppo"]["gold"][0] == pytest.approx(ppo_eval["eval_gold_ppo"])
    assert rows["sft"]["gold"][0] == pytest.approx(ppo_eval["eval_gold_sft"])
    assert rows["ppo"]["kl"][0] == pytest.approx(ppo_eval["eval_kl"])
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| rank | method | gold |" in md and "## Samples" in md
    for method in rows:
        assert f"| {method} |" in md, method
    assert len(results["samples"]) == 3 and set(results["samples"][0]) == {"prompt", *rows}


def test_study_overoptimization_curve(runs):
    out = os.path.join(runs["root"], "study")
    args = ("study.py", "overoptimization", *TINY, "--sft_dir", runs["sft"], "--out_dir", out,
            "--rater_bias", "length", "--iterations", "5", "--bon_max", "4", "--bon_prompts", "8")
    first = run(*args).stdout
    assert os.path.getsize(os.path.join(out, "overoptimization.png")) > 0
    with open(os.path.join(out, "overoptimization.json")) as f:
        curve = json.load(f)["curves"]["length"]
    logged = [r for r in read_jsonl(os.path.join(out, "ppo_length_kl0.01_it5", "metrics.jsonl")) if "gold" in r]
    assert curve["iteration"] == [1, 2, 3, 4, 5] and curve["gold"] == [r["gold"] for r in logged]
    assert curve["sqrt_kl"] == pytest.approx([math.sqrt(max(r["kl"], 0.0)) for r in logged])
    assert all(r["kl_coef"] == 0.01 for r in logged)  # the weak, fixed KL penalty
    assert all(se > 0 for se in curve["gold_se"])  # each iteration's s.e. over its 8 rollouts
    with open(os.path.join(out, "rm_length", "stdout.log")) as f:
        assert "bias length" in f.read()  # the reward model learned from biased raters
    # best-of-n from one draw of 4 SFT samples for each of 8 prompts: n = 1, 2, 4 at the analytic KL
    bon = curve["best_of_n"]
    assert bon["n"] == [1, 2, 4] and bon["kl"] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])
    samples = torch.load(os.path.join(out, "bon_samples.pt"), weights_only=True)
    assert len(samples["texts"]) == 32
    gold = gold_scores(samples["key"]["prompts"], samples["texts"], samples["ended"])
    assert bon["gold"][0] == pytest.approx(gold.mean())  # best-of-1 keeps every sample
    assert bon["gold_se"][0] == pytest.approx(gold.reshape(8, 4).mean(1).std(ddof=1) / math.sqrt(8))  # over prompts
    assert bon["proxy"] == sorted(bon["proxy"])  # the RM's favourite of more samples scores higher by the RM
    assert curve["baseline"] == {"from": "best-of-n, n = 1", "proxy": bon["proxy"][0], "gold": bon["gold"][0]}
    # the fits: RL and best-of-n, proxy and gold; best-of-n's 2 points beyond d = 0 fix its 2 coefficients
    assert set(curve["fits"]) == {"rl_gold", "rl_proxy", "bon_gold", "bon_proxy"}
    assert curve["fits"]["bon_gold"]["r2"] == pytest.approx(1.0) or curve["fits"]["bon_gold"]["r2"] is None
    assert curve["peak"]["window"] == 5 and curve["peak"]["final"] == pytest.approx(np.mean(curve["gold"]))
    assert curve["peak_samples"]["se_from"] == "samples"
    assert "RL gold: alpha" in first and "best-of-n proxy: alpha" in first and "drop" in first
    # a rerun reuses both finished runs and the samples; an RM stopped before its normalisation is trained again
    again = run(*args).stdout
    assert again.count("reusing") == 2 and "best-of-n: the 32 SFT samples" in again
    rm_ckpt = os.path.join(out, "rm_length", "ckpt.pt")
    ckpt = torch.load(rm_ckpt, weights_only=True)
    del ckpt["gain"]
    torch.save(ckpt, rm_ckpt)
    again = run(*args).stdout
    # and the PPO run made from the old RM is stale now: it is made again from the new one
    assert "running train_rm.py" in again and "running train_ppo.py" in again and "reusing" not in again
    # beta_sweep in the same folder, two runs at a time: the RM and the beta 0.01 run are these, 0.3 is new
    sweep = run("study.py", "beta_sweep", *TINY, "--sft_dir", runs["sft"], "--out_dir", out, "--rater_bias",
                "length", "--iterations", "5", "--betas", "0.01,0.3", "--parallel", "2").stdout
    assert sweep.count("reusing") == 2 and sweep.count("running train_ppo.py") == 1
    with open(os.path.join(out, "beta_sweep.json")) as f:
        points = json.load(f)["points"]
    assert [(p["beta"], os.path.basename(p["ppo_dir"])) for p in points] == [
        (0.01, "ppo_length_kl0.01_it5"), (0.3, "ppo_length_kl0.3_it5")]
    for p in points:
        assert p["gold"] == read_jsonl(os.path.join(p["ppo_dir"], "metrics.jsonl"))[-1]["eval_gold_ppo"]
        with open(os.path.join(p["ppo_dir"], "stage_run.json")) as f:
            assert json.load(f)["wall_s"] > 0  # run_stages recorded each run it made
    assert os.path.getsize(os.path.join(out, "beta_sweep.png")) > 0


def test_iterated_rlhf_hooks(runs, tmp_path):
    # train_rm.py --policy_dir --extra_prefs: new pairs on the PPO policy's samples plus the old ones
    rm2 = str(tmp_path / "rm2")
    old = read_jsonl(os.path.join(runs["rm"], "prefs.jsonl"))
    proc = run("train_rm.py", *TINY, "--sft_dir", runs["sft"], "--out_dir", rm2, "--n_prompts", "8",
               "--norm_samples", "8", "--eval_samples", "8", "--policy_dir", runs["ppo"],
               "--extra_prefs", os.path.join(runs["rm"], "prefs.jsonl"))
    assert f"sampled 16 {runs['ppo']} responses" in proc.stdout
    rows = read_jsonl(os.path.join(rm2, "prefs.jsonl"))
    new, kept = rows[:len(rows) - len(old)], rows[len(rows) - len(old):]
    assert [r["chosen"] for r in kept] == [r["chosen"] for r in old]
    assert not {r["group"] for r in new} & {r["group"] for r in kept}  # held out by group: no collisions
    # train_ppo.py --init_policy with no iterations: its final evaluation is the PPO policy's, not SFT's
    ppo2 = str(tmp_path / "ppo2")
    run("train_ppo.py", *TINY, "--sft_dir", runs["sft"], "--rm_dir", runs["rm"], "--out_dir", ppo2,
        "--init_policy", runs["ppo"], "--iterations", "0")
    first, again = (read_jsonl(os.path.join(d, "metrics.jsonl"))[-1] for d in (runs["ppo"], ppo2))
    assert again["eval_gold_ppo"] == first["eval_gold_ppo"] and again["eval_kl"] == first["eval_kl"]
    assert again["eval_kl"] != 0.0  # it is not the SFT policy


def test_study_rounds_compares_fresh_preferences_with_the_first_rm(runs):
    out = os.path.join(runs["root"], "study_rounds")
    run("study.py", "rounds", *TINY, "--sft_dir", runs["sft"], "--out_dir", out, "--rater_bias", "length",
        "--iterations", "4", "--rounds", "1")
    with open(os.path.join(out, "rounds.json")) as f:
        report = json.load(f)["report"]["length"]
    assert report["iterations_per_round"] == 2 and report["ppo_iterations"] == [0, 2, 4]
    fixed, fresh = report["without_new_prefs"], report["with_new_prefs"]
    assert len(fixed) == len(fresh) == 3
    assert fixed[:2] == fresh[:2]  # SFT, then the first PPO segment: the same runs in both branches
    assert fixed[2]["rm"] == fixed[0]["rm"] and fresh[2]["rm"] != fresh[0]["rm"]
    assert fixed[0]["kl"][0] == pytest.approx(0.0, abs=1e-6) and fresh[2]["kl"][0] != 0.0
    # the round's RM learned from new pairs on the PPO policy's samples plus all the first RM's pairs
    first, second = (read_jsonl(os.path.join(d, "prefs.jsonl")) for d in (fresh[0]["rm"], fresh[2]["rm"]))
    new, kept = second[:len(second) - len(first)], second[len(second) - len(first):]
    assert new and [(r["chosen"], r["rejected"]) for r in kept] == [(r["chosen"], r["rejected"]) for r in first]
    assert not {r["group"] for r in new} & {r["group"] for r in kept}
    assert os.path.getsize(os.path.join(out, "rounds.png")) > 0
