"""The KL-gold frontier: every method at a few KL strengths, judged by the gold judge no method sees.

python study.py frontier --sft_dir out/sft --rm_dir out/rm       # reuses both; trains them when not given
python study.py frontier --preset tiny --methods ppo,rloo,bon    # seconds, for tests

Each method runs at each of its KL strengths (beta of the KL in the reward for ppo, reinforce and rloo, fixed;
the coefficient of the k3 term in the loss for grpo and drgrpo; beta for dpo; n for best-of-n), PPO and the
policy-gradient methods with the same iterations and rollout batch (the same episodes). Then every policy
answers the same held-out prompts with the same random draws (as eval.py), and out_dir gets
  frontier.png   held-out gold score against KL to SFT, one curve per method (as the DPO paper's IMDb figure)
  frontier.json  every point: gold (± s.e.), win rate vs SFT, KL, held-out LM loss (the alignment tax: its
  frontier.md    rise over SFT's), words, distinct-2, wall-clock of the run, and the machine's load
Which strength is each method's? The one with the highest gold on --select_prompts training prompts (circled in
the plot, listed last in frontier.md): chosen there, so that the held-out numbers that report it are not chosen
on themselves. Those prompts are ones the methods trained on and the RM learned from (the sample's 87
validation stories are all held out), so the choice can favour a looser leash; it is also a noisy argmax. Runs are subprocesses into out_dir/<method>_<value>; a run finished with the same flags is reused.
"""
import dataclasses
import json
import os
import time

import matplotlib
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_checkpoint, load_model, load_policy
from nanorlhf.config import CommonConfig, FrontierConfig, parse_config, print_config
from nanorlhf.data import load_prompts, selection_prompts
from nanorlhf.evaluate import best_of_n_kl, evaluate_best_of_n, evaluate_policy, heldout_lm_loss
from nanorlhf import studies
from nanorlhf.runtime import setup_runtime

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("ppo", "reinforce", "rloo", "grpo", "drgrpo", "dpo", "bon")


def numbers(text, kind=float):
    return [kind(x) for x in text.split(",") if x.strip()]


def training_runs(cfg, common, sft_dir, rm_dir, methods):
    """Train every method at each KL strength, --parallel runs at a time -> [(method, knob, value, out_dir,
    wall_s)], wall_s as recorded when the run ran (None for an older run without a record)."""
    rl = {**common, "sft_dir": sft_dir, "rm_dir": rm_dir, "iterations": cfg.iterations,
          "eval_prompts": cfg.eval_prompts}
    runs, jobs = [], []
    for method in methods:
        if method == "ppo":
            for beta in numbers(cfg.betas):
                out = os.path.join(cfg.out_dir, f"ppo_beta{beta:g}")
                runs.append((method, "beta", beta, out))
                jobs.append(("train_ppo.py", out, {**rl, "init_kl_coef": beta, "adaptive_kl": False}))
        elif method in ("reinforce", "rloo", "grpo", "drgrpo"):
            knob, values = (("beta", cfg.betas) if method in ("reinforce", "rloo") else ("kl_coef", cfg.grpo_kl_coefs))
            for value in numbers(values):
                out = os.path.join(cfg.out_dir, f"{method}_{knob}{value:g}")
                runs.append((method, knob, value, out))
                jobs.append(("train_pg.py", out, {**rl, "algo": method, "kl_coef": value}))
        elif method == "dpo":
            for beta in numbers(cfg.dpo_betas):
                out = os.path.join(cfg.out_dir, f"dpo_beta{beta:g}")
                runs.append((method, "beta", beta, out))
                jobs.append(("train_dpo.py", out, {**common, "sft_dir": sft_dir, "rm_dir": rm_dir, "beta": beta}))
    studies.run_stages(jobs, cfg.parallel)
    return [(*run, (studies.stage_record(run[3]) or {}).get("wall_s")) for run in runs]


def point(method, knob, value, row, lm_loss, lm_sft, wall_s, source, select_row=None):
    """One row of the table from an evaluation row (means and standard errors) and, where a strength is chosen,
    the evaluation row of the same policy on the selection prompts."""
    return {"method": method, "knob": knob, "value": value, "source": source, "gold": row["gold"][0],
            "select_gold": select_row["gold"][0] if select_row else None,
            "gold_se": row["gold"][1], "win_rate": row["win_rate"][0] if "win_rate" in row else 0.5,
            "kl": row["kl"][0], "kl_analytic": bool(row.get("kl_analytic")), "lm_loss": lm_loss,
            "alignment_tax": lm_loss - lm_sft, "length": row["length"][0], "distinct2": row["distinct2"],
            "ended": row["ended"], "wall_s": wall_s}


def on_select_text(p):
    return "" if p["select_gold"] is None else f" | gold on the selection prompts {p['select_gold']:.3f}"


def evaluate_all(cfg, rt, sft_dir, rm_dir, runs, methods):
    """Every trained policy, best-of-n and SFT on the same held-out prompts with the same draws -> points."""
    try:
        reference, enc, sft_ckpt = load_model(sft_dir, "sft", rt.device, fits=cfg)
        rm, _, rm_ckpt = load_model(rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
    except CheckpointError as e:
        raise SystemExit(str(e))
    reference.eval().requires_grad_(False)
    rm.eval().requires_grad_(False)
    gain, bias = rm_ckpt["gain"], rm_ckpt["bias"]
    prompts = load_prompts(cfg.dataset, cfg.eval_prompts)[1]  # the held-out prompts train_ppo.py evaluates on
    draws = lambda: torch.Generator(rt.device).manual_seed(cfg.seed + 1)  # noqa: E731 (the same for every method)
    sft_row, sft_samples = evaluate_policy(reference, reference, rm, gain, bias, enc, prompts, cfg, rt, draws())
    # the training prompts each method's strength is chosen on: the held-out ones only report the choice
    select = selection_prompts(cfg.dataset, cfg.select_prompts) if cfg.select_prompts else []

    def on_select(policy):
        return evaluate_policy(policy, reference, rm, gain, bias, enc, select, cfg, rt, draws())[0] if select else None
    lm_sft = heldout_lm_loss(reference, enc, cfg.dataset, rt)
    points = [point("sft", "", 0, sft_row, lm_sft, lm_sft, 0.0, sft_dir, on_select(reference))]
    for method, knob, value, out, wall in runs:
        policy = load_policy(out, rt.device, tokenizer_of=sft_ckpt)[0].eval()
        row, _ = evaluate_policy(policy, reference, rm, gain, bias, enc, prompts, cfg, rt, draws(),
                                 baseline_gold=sft_samples["gold"])
        points.append(point(method, knob, value, row, heldout_lm_loss(policy, enc, cfg.dataset, rt), lm_sft, wall,
                            out, on_select(policy)))
        print(f"{method} {knob} {value:g}: gold {row['gold'][0]:.3f} | KL {row['kl'][0]:.2f} | "
              f"win {row['win_rate'][0]:.3f}{on_select_text(points[-1])}", flush=True)
    if "bon" in methods:  # samples of the SFT policy itself: no training, no alignment tax
        for n in numbers(cfg.bon, int):
            t0 = time.time()
            row, _ = evaluate_best_of_n(reference, rm, gain, bias, enc, prompts, n, cfg, rt, draws(),
                                        baseline_gold=sft_samples["gold"])
            wall = time.time() - t0
            chosen_on = evaluate_best_of_n(reference, rm, gain, bias, enc, select, n, cfg, rt, draws())[0] \
                if select else None
            points.append(point("bon", "n", n, row, lm_sft, lm_sft, wall, f"{sft_dir} x {n}", chosen_on))
            print(f"best-of-{n}: gold {row['gold'][0]:.3f} | KL {best_of_n_kl(n):.2f} (analytic)"
                  f"{on_select_text(points[-1])}", flush=True)
    return points


def chosen(points):
    """Each method at the strength with the highest gold on the selection prompts (none without them)."""
    best = {}
    for p in (p for p in points if p["method"] != "sft"):
        known = best.get(p["method"])
        if p["select_gold"] is not None and (known is None or p["select_gold"] > known["select_gold"]):
            best[p["method"]] = p
    return list(best.values())


def markdown(points, cfg):
    lines = [f"# KL-gold frontier ({cfg.preset} preset, {cfg.iterations} iterations per RL run, "
             f"{cfg.eval_prompts} held-out prompts)", "",
             "| method | knob | gold ± s.e. | win vs SFT | KL to SFT | held-out LM loss (tax) | words | distinct-2 | "
             "wall-clock s |", "|" + "---|" * 9]
    for p in points:
        kl = f"{p['kl']:.2f}" + (" (analytic)" if p["kl_analytic"] else "")
        lines.append(f"| {p['method']} | {p['knob']} {p['value']:g} | {p['gold']:.3f} ± {p['gold_se']:.3f} | "
                     f"{p['win_rate']:.3f} | {kl} | {p['lm_loss']:.3f} ({p['alignment_tax']:+.3f}) | "
                     f"{p['length']:.1f} | {p['distinct2']:.3f} | "
                     f"{'—' if p['wall_s'] is None else format(p['wall_s'], '.0f')} |")
    if chosen(points):
        lines += ["", f"Each method at the strength with the highest gold on {cfg.select_prompts} training prompts "
                  f"(SFT there: {points[0]['select_gold']:.3f}), reported on the held-out prompts:", "",
                  "| method | chosen | gold on the selection prompts | held-out gold ± s.e. | win vs SFT | KL to SFT |",
                  "|" + "---|" * 6]
        lines += [f"| {p['method']} | {p['knob']} {p['value']:g} | {p['select_gold']:.3f} | {p['gold']:.3f} ± "
                  f"{p['gold_se']:.3f} | {p['win_rate']:.3f} | {p['kl']:.2f} |" for p in chosen(points)]
    return "\n".join(lines) + "\n"


def plot(points, path, cfg):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sft = points[0]
    for method in dict.fromkeys(p["method"] for p in points[1:]):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in pts], [p["gold"] for p in pts], yerr=[p["gold_se"] for p in pts],
                    marker="o", capsize=3, label=method)
        for p in pts:
            ax.annotate(f"{p['value']:g}", (p["kl"], p["gold"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    picked = chosen(points)
    if picked:
        ax.scatter([p["kl"] for p in picked], [p["gold"] for p in picked], s=160, facecolors="none",
                   edgecolors="black", label="chosen on training prompts")
    ax.axhline(sft["gold"], color="gray", linestyle="--", label="SFT")
    ax.set_xlabel("KL to SFT (nats per response; best-of-n: log n - (n-1)/n)")
    ax.set_ylabel("held-out gold score")
    ax.set_title(f"gold vs KL, {cfg.preset} preset (labels: beta, KL coefficient or n)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    cfg = parse_config(FrontierConfig, "frontier", argv, description=__doc__)
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        raise SystemExit(f"--methods {cfg.methods!r}: give a comma-separated list of {', '.join(METHODS)}")
    print_config(cfg)
    rt = setup_runtime(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig)
              if f.name not in ("out_dir", "resume")}
    sft_dir = cfg.sft_dir or os.path.join(cfg.out_dir, "sft")
    rm_dir = cfg.rm_dir or os.path.join(cfg.out_dir, "rm")
    if not cfg.sft_dir:
        studies.run_stage("train_sft.py", sft_dir, common)
    if not cfg.rm_dir:
        studies.run_stage("train_rm.py", rm_dir, {**common, "sft_dir": sft_dir})
    for given in (cfg.sft_dir, cfg.rm_dir):
        if given and not os.path.exists(ckpt_path(given)):
            raise SystemExit(f"no checkpoint at {ckpt_path(given)}: pass a finished run's folder, or leave the flag "
                             f"empty to train one in {cfg.out_dir}")
    t0 = time.time()
    runs = training_runs(cfg, common, sft_dir, rm_dir, methods)
    points = evaluate_all(cfg, rt, sft_dir, rm_dir, runs, methods)
    load = os.getloadavg()[0]
    with open(os.path.join(cfg.out_dir, "frontier.json"), "w") as f:
        json.dump({"settings": {k: getattr(cfg, k) for k in ("preset", "sft_dir", "rm_dir", "methods", "betas",
                                                              "grpo_kl_coefs", "dpo_betas", "bon", "iterations",
                                                              "eval_prompts", "select_prompts", "seed")},
                   "chosen": [{k: p[k] for k in ("method", "knob", "value")} for p in chosen(points)],
                   "rm_rater_bias": load_checkpoint(rm_dir, "rm")["config"].get("rater_bias", ""),
                   "total_s": time.time() - t0, "load_at_end": load, "cpu_count": os.cpu_count(),
                   "points": points}, f, indent=1)
    with open(os.path.join(cfg.out_dir, "frontier.md"), "w") as f:
        f.write(markdown(points, cfg))
    plot(points, os.path.join(cfg.out_dir, "frontier.png"), cfg)
    print(markdown(points, cfg))
    print(f"saved {cfg.out_dir}/frontier.png, frontier.json, frontier.md ({time.time() - t0:.0f} s, load {load:.1f})")
