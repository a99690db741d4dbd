"""The machinery behind study.py: running a training script as a child stage (reused when a finished run
with the same flags is already there), writing JSON and figures, and the studies' plots."""
import dataclasses
import json
import math
import os
import signal
import sys

import matplotlib
import numpy as np

from nanorlhf.checkpoint import ckpt_path, load_checkpoint
from nanorlhf.evaluate import goodhart_curve
from nanorlhf.metrics import read_metrics
from nanorlhf.guard import run_children
from nanorlhf.runtime import REPO

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

def final_eval(ppo_dir):
    """The held-out evaluation train_ppo.py logs after its last iteration (None if it never got there)."""
    path = os.path.join(ppo_dir, "metrics.jsonl")
    records = read_metrics(path) if os.path.exists(path) else []
    return next((r for r in reversed(records) if "eval_gold_ppo" in r), None)


RECORD = "stage_run.json"  # written by run_stage into a run's folder when the child exited 0: flags, wall-clock


def stage_record(out_dir):
    """What run_stage recorded when the run in out_dir finished: {"flags", "wall_s", "load"}, or None."""
    path = os.path.join(out_dir, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stale(out_dir, flags):
    """A file the run in out_dir was made from (the checkpoints and preference pairs its flags name) was
    written after its checkpoint: the run is of an older upstream."""
    made = os.path.getmtime(ckpt_path(out_dir))
    upstream = [ckpt_path(flags[k]) for k in ("sft_dir", "rm_dir", "init_policy", "policy_dir") if flags.get(k)]
    upstream += [flags[k] for k in ("extra_prefs", "prefs") if flags.get(k)]
    return any(os.path.exists(p) and os.path.getmtime(p) > made for p in upstream)


def finished(out_dir, flags):
    """out_dir holds a run made with these flags that got to its end, after the runs it was made from: an
    upstream run retrained since makes it stale. Judged from its checkpoint (its config, and what a finished
    run of its stage holds) and, where run_stage made it, from its record (the flags, and no later write)."""
    if not os.path.exists(ckpt_path(out_dir)) or stale(out_dir, flags):
        return False
    made = os.path.getmtime(ckpt_path(out_dir))
    record = stage_record(out_dir)
    if record is not None and (record["flags"] != {k: str(v) for k, v in flags.items()}
                               or os.path.getmtime(os.path.join(out_dir, RECORD)) < made):
        return False  # made with other flags, or its checkpoint was written again since it finished
    ckpt = load_checkpoint(out_dir)
    if ckpt["stage"] in ("ppo", "pg"):
        path = os.path.join(out_dir, "metrics.jsonl")
        if not any("eval_win_rate" in r for r in (read_metrics(path) if os.path.exists(path) else [])):
            return False  # stopped before its final evaluation
    if ckpt["stage"] == "rm" and "gain" not in ckpt:
        return False  # stopped before its normalisation
    if ckpt["stage"] == "rm" and int(ckpt["config"].get("ensemble", 1)) > 1 and \
            not (os.path.exists(os.path.join(out_dir, "ensemble.pt"))
                 and os.path.getmtime(os.path.join(out_dir, "ensemble.pt")) >= os.path.getmtime(ckpt_path(out_dir))):
        return False  # an ensemble whose members did not all finish
    return all(str(ckpt["config"].get(k)) == str(v) for k, v in flags.items())


FAILED = "stage_failed.json"  # written by run_stages when a child failed (not stopped by a signal): no resume
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)


def child_config(script, flags):
    """The whole config `script --flag value ..` builds (defaults < preset < flags), as strings; None for a
    script that is not a training stage or flags it refuses."""
    from nanorlhf import config as c
    stages = {"train_sft.py": (c.SFTConfig, "sft"), "train_rm.py": (c.RMConfig, "rm"),
              "train_ppo.py": (c.PPOConfig, "ppo"), "train_pg.py": (c.PGConfig, "pg"),
              "train_dpo.py": (c.DPOConfig, "dpo")}
    if script not in stages:
        return None
    cls, stage = stages[script]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    try:
        typed = {k: (str(v).lower() in ("1", "true") if types.get(k) in (bool, "bool") else v)
                 for k, v in flags.items()}
        return {k: str(v) for k, v in dataclasses.asdict(c.make_config(cls, stage, **typed)).items()}
    except (ValueError, TypeError):
        return None


def interrupted(script, out_dir, flags):
    """out_dir holds a run of `script` that was stopped before its end (Ctrl-C, SIGTERM, a kill at a session's
    time limit) and saved a checkpoint to go on from, made with the very config these flags build: run_stages
    continues it with --resume instead of starting over. Not a run that failed (run_stages marks those), not an
    ensemble (its members are runs of their own), not a run older than what it was made from."""
    if not os.path.exists(ckpt_path(out_dir)) or stage_record(out_dir) is not None \
            or os.path.exists(os.path.join(out_dir, FAILED)) or stale(out_dir, flags) or finished(out_dir, flags):
        return False
    saved, wanted = load_checkpoint(out_dir)["config"], child_config(script, flags)
    if wanted is None or int(saved.get("ensemble", 1)) > 1:
        return False
    return all(str(saved.get(k)) == v for k, v in wanted.items() if k not in ("out_dir", "resume"))


def run_stage(script, out_dir, flags):
    """python script --out_dir out_dir --flag value .. (the script found next to study.py) in a child process,
    unless out_dir already holds a finished run with these flags. Its wall-clock seconds and the machine's
    load go into out_dir/stage_run.json (stage_record). -> out_dir"""
    run_stages([(script, out_dir, flags)])
    return out_dir


def run_stages(jobs, parallel=1):
    """run_stage for each (script, out_dir, flags) of jobs, up to `parallel` children at a time. With more than
    one, each child runs on one thread (OMP_NUM_THREADS=1): on a CPU two small runs side by side get more from
    two cores than one run on both. A failed run stops the study with the end of its log."""
    todo = []
    for script, out_dir, flags in jobs:
        if finished(out_dir, flags):
            print(f"reusing {out_dir} (finished with the same flags)")
            continue
        # the script found next to this one; run in the caller's directory, where relative paths (out_dir) point
        resume = interrupted(script, out_dir, flags)
        command = [sys.executable, os.path.join(REPO, script), "--out_dir", out_dir,
                   *[a for k, v in flags.items() for a in (f"--{k}", str(v))], *(["--resume", "True"] if resume else [])]
        os.makedirs(out_dir, exist_ok=True)
        for name in (RECORD, FAILED):  # the run below replaces the one they described
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        print(f"{'resuming (it was stopped before its end)' if resume else 'running'} {script} -> {out_dir} "
              f"(output in {os.path.join(out_dir, 'stdout.log')})", flush=True)
        todo.append((script, out_dir, flags, command))
    # a resumed run's output goes after the stopped one's
    logs = [open(os.path.join(out_dir, "stdout.log"), "a" if "--resume" in c else "w") for _, out_dir, _, c in todo]
    def record(i, code, wall):  # as each child exits, not after the batch: a study stopped later keeps it
        script, out_dir, flags, command = todo[i]
        if code not in (0, None) and code not in STOPPED:  # a crash or a guard's stop: the next study starts over
            save_json(os.path.join(out_dir, FAILED), {"exit": code, "wall_s": wall})
        if code == 0:
            save_json(os.path.join(out_dir, RECORD), {"flags": {k: str(v) for k, v in flags.items()},
                                                     "wall_s": wall, "load": os.getloadavg()[0]})
            print(f"  {out_dir} done in {wall:.0f} s", flush=True)
    try:  # signals reach every child; each is waited for
        results = run_children([c for *_, c in todo], logs, parallel,
                               env={**os.environ, "OMP_NUM_THREADS": "1"} if parallel > 1 else None, on_exit=record)
    finally:
        for log in logs:
            log.close()
    for (script, out_dir, flags, command), (code, wall) in zip(todo, results):
        if code is None:
            raise SystemExit(f"stopped by a signal before {script} -> {out_dir} started; rerun the study to go on")
        if code != 0:
            with open(os.path.join(out_dir, "stdout.log")) as log:
                tail = log.read()[-3000:]
            raise SystemExit(f"{script} failed (exit {code}); the end of {out_dir}/stdout.log:\n{tail}\n"
                             f"the command: {' '.join(command)}")


def save_json(path, obj):
    """obj as strict JSON: nan (a fit with too few points) is written as null."""
    def strict(x):
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x
    with open(path, "w") as f:
        json.dump(strict(obj), f, indent=1, allow_nan=False)


def save_figure(fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")


def plot_overoptimization(curves, kl_coef, path):
    """One panel per bias: proxy and gold against sqrt(KL), PPO's iterations and best-of-n, with their fits."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (bias, c) in zip(axes[0], curves.items()):
        gold_ax = ax.twinx()
        bon = c.get("best_of_n")
        for axis, key, rl_key, color, label in (
                (ax, "proxy", "proxy_reward", "tab:blue", "reward PPO optimises (RM; -1 unended)"),
                (gold_ax, "gold", "gold", "tab:orange", "gold score")):
            axis.scatter(c["sqrt_kl"], c[rl_key], s=8, alpha=0.3, color=color)
            if bon:
                axis.errorbar(bon["sqrt_kl"], bon[key], yerr=bon[f"{key}_se"], fmt="s", ms=4, capsize=2, color=color)
            for form, xs, style in (("rl", c["sqrt_kl"], "-"), ("bon", bon["sqrt_kl"] if bon else [], "--")):
                f = c["fits"].get(f"{form}_{key}")
                if f and math.isfinite(f["alpha"]) and len(xs):
                    d = np.linspace(0, max(xs), 100)
                    axis.plot(d, c["baseline"][key] + goodhart_curve(form, d, f["alpha"], f["beta"]), style,
                              color=color)
            axis.set_ylabel(label, color=color)
        ax.set_xlabel("sqrt(KL to SFT), KL in nats per response")
        ax.set_title(f"raters' bias: {bias}")
    save_figure(fig, path, f"PPO per iteration (dots, fit -) at fixed beta {kl_coef:g};\n"
                                             f"best-of-n (squares, fit --)")


def plot_beta_sweep(points, biases, iterations, path):
    """Held-out gold (with s.e.) and proxy reward against KL, one line per bias, each point a beta."""
    fig, (ax_gold, ax_reward) = plt.subplots(1, 2, figsize=(11, 4))
    for bias in biases:
        pts = [p for p in points if p["bias"] == bias]
        kl = [p["kl"] for p in pts]
        ax_gold.errorbar(kl, [p["gold"] for p in pts], yerr=[p["gold_se"] for p in pts], marker="o", capsize=3,
                         label=f"bias {bias}")
        ax_reward.plot(kl, [p["reward"] for p in pts], marker="o", label=f"bias {bias}")
        for p in pts:
            ax_gold.annotate(f"β={p['beta']:g}", (p["kl"], p["gold"]), textcoords="offset points", xytext=(4, 4),
                             fontsize=8)
    ax_gold.axhline(points[0]["sft_gold"], color="gray", linestyle="--", label="SFT")
    for ax, ylabel in ((ax_gold, "held-out gold score"), (ax_reward, "held-out proxy RM reward")):
        ax.set_xlabel("KL to SFT (nats per response)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    save_figure(fig, path, f"PPO at fixed KL coefficients, {iterations} iterations each")


def plot_rounds(report, segment, rounds, kl_coef, path):
    fig, axes = plt.subplots(len(report), 2, figsize=(11, 4 * len(report)), squeeze=False)
    for (ax_gold, ax_acc), bias in zip(axes, report):
        x = report[bias]["ppo_iterations"]
        for name in ("without_new_prefs", "with_new_prefs"):
            points = report[bias][name]
            label = name.replace("_", " ")
            ax_gold.errorbar(x, [p["gold"][0] for p in points], yerr=[p["gold"][1] for p in points], marker="o",
                             capsize=3, label=label)
            ax_acc.plot(x, [p["rm_gold_acc"] for p in points], marker="o", label=label)
        for ax, ylabel in ((ax_gold, "held-out gold score"), (ax_acc, "RM-gold pairwise agreement\non own samples")):
            ax.set_xlabel(f"PPO iterations (a new round every {segment})")
            ax.set_ylabel(ylabel)
            ax.set_title(f"raters' bias: {bias}")
            ax.legend()
            ax.grid(alpha=0.3)
    save_figure(fig, path, f"iterated RLHF: {rounds} extra rounds of preferences, fixed beta {kl_coef:g}")
