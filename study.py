"""Studies of what goes wrong, and what helps, when a policy optimises a learned reward.

python study.py overoptimization        # biased raters -> RM -> PPO with a weak KL penalty, a long run
python study.py beta_sweep              # PPO at several fixed KL coefficients: held-out gold and KL of each
python study.py rounds --rounds 2       # iterated RLHF: fresh preferences on the current policy each round
python study.py overoptimization --preset tiny --iterations 3 --rater_bias length   # seconds, for tests
python study.py frontier --sft_dir out/sft --rm_dir out/rm   # every method's gold vs KL (nanorlhf/frontier.py)

overoptimization (Gao et al. 2022): the reward model learns from raters with a hidden taste (length, or
  gushing words) that the gold judge lacks; PPO with a weak, fixed KL penalty then pushes on it. The proxy
  RM reward and the gold score of each PPO iteration's samples (train_ppo.py logs both) are drawn against
  sqrt(KL to SFT): where the proxy keeps rising and gold stops, the policy exploits the RM.
beta_sweep: the same RM, PPO at each fixed beta; the final held-out gold against KL is the trade-off.
rounds (InstructGPT, Ouyang et al. 2022; Bai et al. 2022): after a PPO segment the same simulated raters
  compare the current policy's samples, the RM is retrained on old + new pairs, and PPO continues from the
  current policy (train_rm.py --policy_dir --extra_prefs, train_ppo.py --init_policy). Compared with
  continuing on the first RM for the same iterations: held-out gold, and how well the RM that trained the
  policy agrees with the gold judge on the policy's own samples.

The training scripts run as subprocesses with the study's settings (--preset etc.), each into its own
folder under out_dir (its console output in stdout.log there). A finished run with the same flags is
reused, so a study can be rerun or extended; delete the folder to start over. Writes to out_dir:
  overoptimization.png/.json   per PPO iteration: sqrt(KL), proxy reward (as PPO sees it: the no-EOS penalty
                               for unended responses), gold; one panel per bias
  beta_sweep.png/.json         per beta: held-out gold (± s.e.), KL, proxy reward, win rate vs SFT
  rounds.png/.json             per round, with and without new preferences: gold, KL, RM-vs-gold agreement
"""
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time

import matplotlib
import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_checkpoint, load_model
from nanorlhf.config import CommonConfig, StudyConfig, parse_config, print_config
from nanorlhf.data import load_corpus, split_prompt, train_val_stories
from nanorlhf.evaluate import evaluate_policy
from nanorlhf.metrics import read_metrics, spearman
from nanorlhf.runtime import run_child, setup_runtime

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

STUDIES = ("overoptimization", "beta_sweep", "rounds")
BIASES = ("none", "length", "flowery")
ROOT = os.path.dirname(os.path.abspath(__file__))
SMOOTH = 5  # iterations in the running mean drawn through the noisy per-iteration points

study = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
if study == "frontier":  # its own settings (FrontierConfig) and module
    from nanorlhf.frontier import main
    sys.exit(main(sys.argv[2:]))
cfg = parse_config(StudyConfig, "study", sys.argv[2 if study else 1:], description=__doc__)
if study not in STUDIES:
    raise SystemExit(f"name a study first: python study.py {{{'|'.join(STUDIES)}}} [--flags]"
                     + (f" (got {study!r})" if study else ""))
biases = [b.strip() for b in cfg.rater_bias.split(",") if b.strip()]
if not biases or set(biases) - set(BIASES):
    raise SystemExit(f"--rater_bias {cfg.rater_bias!r}: give a comma-separated list of {', '.join(BIASES)}")
print_config(cfg)
rt = setup_runtime(cfg)
common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig) if f.name not in ("out_dir", "resume")}
sft_dir = cfg.sft_dir or os.path.join(cfg.out_dir, "sft")
os.makedirs(cfg.out_dir, exist_ok=True)


# ---------------------------------------------------------------- running the stages
def final_eval(ppo_dir):
    """The held-out evaluation train_ppo.py logs after its last iteration (None if it never got there)."""
    path = os.path.join(ppo_dir, "metrics.jsonl")
    records = read_metrics(path) if os.path.exists(path) else []
    return next((r for r in reversed(records) if "eval_gold_ppo" in r), None)


def finished(out_dir, flags):
    """out_dir holds a run made with these flags that got to its end (a checkpoint stores its config),
    after the runs it was made from: an upstream run retrained since makes it stale."""
    if not os.path.exists(ckpt_path(out_dir)):
        return False
    ckpt = load_checkpoint(out_dir)
    if ckpt["stage"] == "ppo" and final_eval(out_dir) is None:
        return False  # stopped before its final evaluation
    if ckpt["stage"] == "rm" and "gain" not in ckpt:
        return False  # stopped before its normalisation
    made = os.path.getmtime(ckpt_path(out_dir))
    upstream = [ckpt_path(flags[k]) for k in ("sft_dir", "rm_dir", "init_policy", "policy_dir") if flags.get(k)]
    upstream += [flags["extra_prefs"]] if flags.get("extra_prefs") else []
    if any(os.path.exists(p) and os.path.getmtime(p) > made for p in upstream):
        return False
    return all(str(ckpt["config"].get(k)) == str(v) for k, v in flags.items())


def run_stage(script, out_dir, **flags):
    """python script --out_dir out_dir with the study's common settings and flags, unless already done."""
    flags = {**common, **flags}
    if finished(out_dir, flags):
        print(f"reusing {out_dir} (finished with the same flags)")
        return out_dir
    # the script found next to this one; run in the caller's directory, where relative paths (out_dir) point
    command = [sys.executable, os.path.join(ROOT, script), "--out_dir", out_dir,
               *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "stdout.log")
    print(f"running {script} -> {out_dir} (output in {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        code = run_child(command, stdout=log, stderr=subprocess.STDOUT)  # signals reach it; it is waited for
    if code != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{script} failed (exit {code}); the end of {log_path}:\n{tail}\n"
                         f"the command: {' '.join(command)}")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return out_dir


@functools.cache
def sft():
    """The study's own SFT run (made again if its settings changed); a given --sft_dir is used as it is."""
    if not cfg.sft_dir:
        run_stage("train_sft.py", sft_dir)
    return sft_dir


def reward_model(bias, out_dir=None, **flags):
    """An RM trained on raters with this bias (flags: policy_dir, extra_prefs for later rounds)."""
    return run_stage("train_rm.py", out_dir or os.path.join(cfg.out_dir, f"rm_{bias}"), sft_dir=sft(),
                     rater_bias="" if bias == "none" else bias, rater_bias_weight=cfg.rater_bias_weight, **flags)


def ppo(out_dir, rm_dir, kl_coef, iterations=None, init_policy=""):
    """PPO with a fixed KL coefficient (no adaptive controller)."""
    return run_stage("train_ppo.py", out_dir, sft_dir=sft(), rm_dir=rm_dir, init_kl_coef=kl_coef, adaptive_kl=False,
                     iterations=iterations or cfg.iterations, eval_prompts=cfg.eval_prompts, init_policy=init_policy)


def save_json(name, obj):
    with open(os.path.join(cfg.out_dir, name), "w") as f:
        json.dump(obj, f, indent=1)


def save_figure(fig, name, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, name), dpi=110)
    plt.close(fig)
    print(f"saved {cfg.out_dir}/{name}")


def running_mean(x, window=SMOOTH):
    x = np.asarray(x, dtype=float)
    return np.array([x[max(0, i - window + 1):i + 1].mean() for i in range(len(x))])


# ---------------------------------------------------------------- the studies
def overoptimization():
    curves = {}
    for bias in biases:
        rm_dir = reward_model(bias)
        ppo_dir = ppo(os.path.join(cfg.out_dir, f"ppo_{bias}_kl{cfg.kl_coef:g}_it{cfg.iterations}"), rm_dir, cfg.kl_coef)
        steps = [r for r in read_metrics(os.path.join(ppo_dir, "metrics.jsonl")) if "gold" in r and "kl" in r]
        curves[bias] = {"ppo_dir": ppo_dir, "rm_dir": rm_dir, "iteration": [r["step"] for r in steps],
                        "kl": [r["kl"] for r in steps], "sqrt_kl": [math.sqrt(max(r["kl"], 0.0)) for r in steps],
                        "proxy_reward": [r["reward"] for r in steps], "gold": [r["gold"] for r in steps],
                        "final_eval": final_eval(ppo_dir)}
        c = curves[bias]
        peak = int(np.argmax(running_mean(c["gold"])))
        print(f"bias {bias}: proxy reward {c['proxy_reward'][0]:.3f} -> {c['proxy_reward'][-1]:.3f} | gold "
              f"{c['gold'][0]:.3f} -> {c['gold'][-1]:.3f} (smoothed peak at iteration {c['iteration'][peak]}, "
              f"sqrt KL {c['sqrt_kl'][peak]:.2f}) | KL {c['kl'][-1]:.2f}")
    save_json("overoptimization.json", {"kl_coef": cfg.kl_coef, "iterations": cfg.iterations, "curves": curves})
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (bias, c) in zip(axes[0], curves.items()):
        gold_ax = ax.twinx()
        for axis, key, color, label in ((ax, "proxy_reward", "tab:blue", "reward PPO optimises (RM; -1 unended)"),
                                        (gold_ax, "gold", "tab:orange", "gold score")):
            axis.scatter(c["sqrt_kl"], c[key], s=8, alpha=0.3, color=color)
            axis.plot(running_mean(c["sqrt_kl"]), running_mean(c[key]), color=color)
            axis.set_ylabel(label, color=color)
        ax.set_xlabel("sqrt(KL to SFT), KL in nats per response")
        ax.set_title(f"raters' bias: {bias}")
    save_figure(fig, "overoptimization.png", f"PPO samples per iteration, fixed beta {cfg.kl_coef:g} "
                                             f"(line: running mean of {SMOOTH})")


def beta_sweep():
    betas = [float(b) for b in cfg.betas.split(",") if b.strip()]
    points = []
    for bias in biases:
        rm_dir = reward_model(bias)
        for beta in betas:
            ppo_dir = ppo(os.path.join(cfg.out_dir, f"ppo_{bias}_kl{beta:g}_it{cfg.iterations}"), rm_dir, beta)
            e = final_eval(ppo_dir)
            points.append({"bias": bias, "beta": beta, "ppo_dir": ppo_dir, "gold": e["eval_gold_ppo"],
                           "gold_se": e["eval_gold_ppo_se"], "kl": e["eval_kl"], "reward": e["eval_reward_ppo"],
                           "win_rate": e["eval_win_rate"], "sft_gold": e["eval_gold_sft"], "final_eval": e})
            print(f"bias {bias} | beta {beta:g} | held-out gold {e['eval_gold_ppo']:.3f} "
                  f"± {e['eval_gold_ppo_se']:.3f} "
                  f"(SFT {e['eval_gold_sft']:.3f}) | KL {e['eval_kl']:.2f} | reward {e['eval_reward_ppo']:.3f} | "
                  f"win rate {e['eval_win_rate']:.3f}")
    save_json("beta_sweep.json", {"iterations": cfg.iterations, "points": points})
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
    save_figure(fig, "beta_sweep.png", f"PPO at fixed KL coefficients, {cfg.iterations} iterations each")


def rounds():
    segment = max(1, cfg.iterations // (cfg.rounds + 1))  # the same PPO budget with and without new preferences
    if segment * (cfg.rounds + 1) != cfg.iterations:
        print(f"--iterations {cfg.iterations} split into {cfg.rounds + 1} segments: {segment} each, "
              f"{segment * (cfg.rounds + 1)} in all")
    try:
        reference, enc, sft_ckpt = load_model(sft(), "sft", rt.device)
    except CheckpointError as e:
        raise SystemExit(str(e))
    reference.eval()
    _, val_stories = train_val_stories(load_corpus(cfg.dataset))
    prompts = [split_prompt(val_stories[i % len(val_stories)])[0] for i in range(cfg.eval_prompts)]
    measured = {}

    def measure(policy_dir, rm_dir, stage="ppo"):
        """The policy's held-out samples scored by the RM it was trained on, and by the gold judge."""
        if (policy_dir, rm_dir) not in measured:
            policy = load_model(policy_dir, stage, rt.device, tokenizer_of=sft_ckpt)[0].eval()
            rm, _, rm_ckpt = load_model(rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
            row, samples = evaluate_policy(policy, reference, rm.eval(), rm_ckpt["gain"], rm_ckpt["bias"], enc,
                                           prompts, cfg, rt, torch.Generator(rt.device).manual_seed(cfg.seed + 1))
            measured[policy_dir, rm_dir] = {"policy": policy_dir, "rm": rm_dir, "gold": row["gold"],
                                            "reward": row["reward"], "kl": row["kl"], "rm_gold_acc": row["rm_gold_acc"],
                                            "spearman_rm_gold": spearman(samples["rewards"], samples["gold"])}
        return measured[policy_dir, rm_dir]

    report = {}
    for bias in biases:
        base = os.path.join(cfg.out_dir, f"rounds_{bias}")
        rm0 = reward_model(bias)
        first = ppo(os.path.join(base, "ppo_0"), rm0, cfg.kl_coef, segment)
        branches = {"without_new_prefs": [(first, rm0)], "with_new_prefs": [(first, rm0)]}
        for r in range(1, cfg.rounds + 1):
            policy_dir, _ = branches["without_new_prefs"][-1]  # keep optimising the first RM
            branches["without_new_prefs"].append(
                (ppo(os.path.join(base, f"ppo_fixed_{r}"), rm0, cfg.kl_coef, segment, init_policy=policy_dir), rm0))
            policy_dir, rm_dir = branches["with_new_prefs"][-1]  # fresh pairs on this policy, RM on old + new
            # one pass over old + new pairs (as InstructGPT trains its RM): each round costs about what
            # the first RM did, though it learns from r + 1 times the pairs
            new_rm = reward_model(bias, os.path.join(base, f"rm_{r}"), policy_dir=policy_dir,
                                  extra_prefs=os.path.join(rm_dir, "prefs.jsonl"), epochs=1)
            new_policy = ppo(os.path.join(base, f"ppo_iter_{r}"), new_rm, cfg.kl_coef, segment, init_policy=policy_dir)
            branches["with_new_prefs"].append((new_policy, new_rm))
        start = measure(sft(), rm0, stage="sft")
        report[bias] = {"iterations_per_round": segment, "ppo_iterations": [segment * r for r in range(cfg.rounds + 2)],
                        **{name: [start] + [measure(*run) for run in runs] for name, runs in branches.items()}}
        print(f"bias {bias}: round | PPO iterations | gold without / with new prefs | RM-gold agreement without / with")
        for r, (a, b) in enumerate(zip(report[bias]["without_new_prefs"], report[bias]["with_new_prefs"])):
            print(f"  {r - 1 if r else 'SFT'} | {segment * r} | {a['gold'][0]:.3f} / {b['gold'][0]:.3f} | "
                  f"{a['rm_gold_acc']:.3f} / {b['rm_gold_acc']:.3f}")
    save_json("rounds.json", {"rounds": cfg.rounds, "kl_coef": cfg.kl_coef, "report": report})
    plot_rounds(report, segment)


def plot_rounds(report, segment):
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
    save_figure(fig, "rounds.png", f"iterated RLHF: {cfg.rounds} extra rounds of preferences, "
                                   f"fixed beta {cfg.kl_coef:g}")


{"overoptimization": overoptimization, "beta_sweep": beta_sweep, "rounds": rounds}[study]()
