"""study.py guard: do reward-model ensembles warn of, and guard against, over-optimisation? Checked against gold.

For each rater bias: an ensemble of reward models (train_rm.py --ensemble K) on the biased raters, then PPO with
the weak, fixed KL penalty of the overoptimization study and four rewards: (a) member 0 alone, (b) the ensemble
mean, (c) mean - lambda * std, (d) the minimum (Coste et al. 2023). Every run logs the monitors (train_ppo.py;
none reads gold). Per run: gold and proxy against sqrt(KL), the iteration gold peaked, and for each monitor the
iteration it warned. Then the false alarms: an unbiased ensemble and PPO with member 0 and the default adaptive
beta, where nothing should be hacked. Writes guard.json and guard.png to out_dir.
"""
import math
import os

import numpy as np

from nanorlhf.monitors import MONITORS, first_warning
from nanorlhf.evaluate import peak_vs_final
from nanorlhf.metrics import read_metrics
from nanorlhf.studies import final_eval, finished, plt, save_figure, save_json

REWARDS = ("", "mean", "mean_std", "min")  # "" is member 0 alone: one reward model


def label(how):
    return how or "single"


def read_run(ppo_dir, patience, smooth):
    """A PPO run's per-iteration curves, the iteration its gold peaked and the iterations its monitors warned."""
    steps = [r for r in read_metrics(os.path.join(ppo_dir, "metrics.jsonl")) if "gold" in r and "kl" in r]
    it = [r["step"] for r in steps]
    c = {"ppo_dir": ppo_dir, "iteration": it, "sqrt_kl": [math.sqrt(max(r["kl"], 0.0)) for r in steps],
         "reward": [r["reward"] for r in steps], "gold": [r["gold"] for r in steps],
         "gold_se": [r.get("gold_se") for r in steps],
         "monitors": {name: [r.get(name) for r in steps] for name in MONITORS}, "final_eval": final_eval(ppo_dir)}
    gold = np.asarray(c["gold"], dtype=float)
    if len(gold) >= smooth:  # the centre of the best window of `smooth` iterations; and did gold fall after it?
        p = peak_vs_final(gold, smooth)
        c["gold_peak"] = {"iteration": it[p["peak_end"] - smooth // 2], "window": smooth, "drop": p["drop"],
                          "z": p["z"]}
    else:  # too few iterations to smooth (a tiny test run): the best single iteration
        c["gold_peak"] = {"iteration": it[int(np.argmax(gold))], "window": 1, "drop": float(gold.max() - gold[-1]),
                          "z": float("nan")}
    c["warnings"] = {}
    for name, (threshold, direction, _) in MONITORS.items():
        i = first_warning(c["monitors"][name], threshold, direction, patience)
        c["warnings"][name] = None if i is None else {
            "iteration": it[i], "after_gold_peak": it[i] - c["gold_peak"]["iteration"]}
    tail = slice(-min(smooth, len(gold)), None)  # the last window: where each run ended
    c["final"] = {"window": min(smooth, len(gold)), "gold": float(gold[tail].mean()), "sqrt_kl": float(np.mean(c["sqrt_kl"][tail])),
                  "reward": float(np.mean(c["reward"][tail]))}
    return c


def print_run(name, c):
    e = c["final_eval"] or {}
    warned = ", ".join(f"{k} at {w['iteration']} ({w['after_gold_peak']:+d})" for k, w in c["warnings"].items() if w)
    print(f"  {name:>9} | gold peak at iteration {c['gold_peak']['iteration']} (drop after it "
          f"{c['gold_peak']['drop']:.3f}, z {c['gold_peak']['z']:.1f}) | last {c['final']['window']} iterations: "
          f"gold {c['final']['gold']:.3f}, sqrt KL {c['final']['sqrt_kl']:.2f} | held-out gold "
          f"{e.get('eval_gold_ppo', float('nan')):.3f} (SFT {e.get('eval_gold_sft', float('nan')):.3f}) | "
          f"warned: {warned or 'none'}")


def prefs_of(cfg, bias, rm_flags):
    """The preference pairs of the overoptimization study's RM for this bias (out_dir/rm_<bias>), when that RM
    finished with the very flags the overoptimization study gives it now (rm_flags(bias): the same SFT model,
    raters and preset): the ensemble learns from them instead of sampling and labelling its own (on the cpu
    preset that saves ~25 minutes per ensemble). "" when there are none to reuse."""
    rm_dir = os.path.join(cfg.out_dir, f"rm_{bias}")
    path = os.path.join(rm_dir, "prefs.jsonl")
    return path if os.path.exists(path) and finished(rm_dir, rm_flags(bias)) else ""


def run(cfg, sft_dir, run_stages, biases, rm_flags, smooth=5, patience=3):
    """cfg: the StudyConfig; run_stages([(script, out_dir, flags)]) runs stages with the study's common flags,
    --parallel at a time: first every ensemble, then every PPO run. rm_flags(bias): the whole flags of the
    overoptimization study's RM of that bias, whose pairs an ensemble reuses (prefs_of)."""
    biased = [b for b in biases if b != "none"]
    rm_dirs = {b: os.path.join(cfg.out_dir, f"guard_rm_{b}_k{cfg.ensemble}") for b in biased + ["none"]}
    raters = {b: dict(sft_dir=sft_dir, rater_bias="" if b == "none" else b, rater_bias_weight=cfg.rater_bias_weight)
              for b in rm_dirs}
    run_stages([("train_rm.py", rm_dir, dict(raters[b], ensemble=cfg.ensemble,
                                             **({"prefs": p} if (p := prefs_of(cfg, b, rm_flags)) else {})))
                for b, rm_dir in rm_dirs.items()])
    ppo = dict(sft_dir=sft_dir, iterations=cfg.iterations, eval_prompts=cfg.eval_prompts, monitor_patience=patience)
    runs = {(b, label(how)): os.path.join(cfg.out_dir, f"guard_ppo_{b}_{label(how)}_kl{cfg.kl_coef:g}_"
                                                       f"it{cfg.iterations}") for b in biased for how in REWARDS}
    # false alarms: unbiased raters, member 0 alone, the default adaptive beta (a run a practitioner would make)
    unbiased = os.path.join(cfg.out_dir, f"guard_ppo_none_single_adaptive_it{cfg.iterations}")
    run_stages([("train_ppo.py", runs[b, label(how)], dict(ppo, rm_dir=rm_dirs[b], init_kl_coef=cfg.kl_coef,
                                                            adaptive_kl=False, reward_ensemble=how,
                                                            ensemble_lambda=cfg.ensemble_lambda))
                for b in biased for how in REWARDS] + [("train_ppo.py", unbiased, dict(ppo, rm_dir=rm_dirs["none"]))])
    report = {}
    for bias in biased:
        report[bias] = {}
        print(f"bias {bias}: PPO at fixed beta {cfg.kl_coef:g}, {cfg.iterations} iterations, an ensemble of "
              f"{cfg.ensemble} | reward | gold peak | where it ended | held-out gold | monitors' warnings "
              f"(iterations after the gold peak)")
        for how in REWARDS:
            report[bias][label(how)] = c = read_run(runs[bias, label(how)], patience, smooth)
            print_run(label(how), c)
    c = read_run(unbiased, patience, smooth)
    c["false_alarms"] = [k for k, w in c["warnings"].items() if w]
    report["unbiased_adaptive_beta"] = c
    print("unbiased raters, default adaptive beta (a warning here is a false alarm unless gold fell):")
    print_run("single", c)
    save_json(os.path.join(cfg.out_dir, "guard.json"), {
        "kl_coef": cfg.kl_coef, "iterations": cfg.iterations, "ensemble": cfg.ensemble,
        "ensemble_lambda": cfg.ensemble_lambda, "patience": patience, "window": smooth,
        "thresholds": {k: {"threshold": t, "direction": d, "what": w} for k, (t, d, w) in MONITORS.items()},
        "report": report})
    plot_guard(report, cfg, os.path.join(cfg.out_dir, "guard.png"))


def plot_guard(report, cfg, path):
    """Per bias: gold against sqrt(KL) for each reward; gold against iteration with the single RM's warnings."""
    rows = [(k, v) for k, v in report.items() if k != "unbiased_adaptive_beta"]
    rows.append(("unbiased_adaptive_beta", {"single": report["unbiased_adaptive_beta"]}))
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.8 * len(rows)), squeeze=False)
    for (ax_kl, ax_it), (bias, runs) in zip(axes, rows):
        for name, c in runs.items():
            ax_kl.plot(c["sqrt_kl"], c["gold"], marker=".", label=name)
            ax_it.plot(c["iteration"], c["gold"], label=name)
        single = runs["single"]
        ax_it.axvline(single["gold_peak"]["iteration"], color="black", linestyle="--", label="single: gold peak")
        for (name, w), color in zip(single["warnings"].items(), ("tab:red", "tab:purple", "tab:brown", "tab:gray")):
            if w:
                ax_it.axvline(w["iteration"], color=color, linestyle=":", label=f"single: {name} warns")
        ax_kl.set_xlabel("sqrt(KL to SFT)")
        ax_it.set_xlabel("PPO iteration")
        for ax in (ax_kl, ax_it):
            ax.set_ylabel("gold score of the rollouts")
            ax.set_title("no bias, adaptive beta (false alarms)" if bias == "unbiased_adaptive_beta"
                         else f"raters' bias: {bias}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path, f"RM ensemble of {cfg.ensemble}: conservative rewards and monitors, fixed beta "
                           f"{cfg.kl_coef:g} (unbiased: adaptive beta)")
