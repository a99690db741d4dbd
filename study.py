"""Studies of what goes wrong, and what helps, when a policy optimises a learned reward.

python study.py overoptimization        # biased raters -> RM -> PPO with a weak KL penalty, and best-of-n
python study.py beta_sweep              # PPO at several fixed KL coefficients: held-out gold and KL of each
python study.py rounds --rounds 2       # iterated RLHF: fresh preferences on the current policy each round
python study.py guard --rater_bias length   # RM ensembles: conservative rewards and gold-free monitors vs gold
python study.py overoptimization --preset tiny --iterations 3 --rater_bias length   # seconds, for tests
python study.py frontier --sft_dir out/sft --rm_dir out/rm   # every method's gold vs KL (nanorlhf/frontier.py)

overoptimization (Gao et al. 2022): the reward model learns from raters with a hidden taste (length, or
  gushing words) that the gold judge lacks; PPO with a weak, fixed KL penalty then pushes on it. The proxy
  RM reward and the gold score of each PPO iteration's samples (train_ppo.py logs both) are drawn against
  sqrt(KL to SFT): where the proxy keeps rising and gold stops, the policy exploits the RM. Best-of-n on the
  same RM (n = 1, 2, 4 .. --bon_max, from one draw of bon_max SFT samples per held-out prompt) is the other
  way to spend KL. Both get Gao et al.'s forms fitted to the gain over SFT, d = sqrt(KL): RL
  d (alpha - beta log d), best-of-n d (alpha - beta d); and PPO's gold a test: its best mean over SMOOTH
  iterations against its last, in standard errors.
beta_sweep: the same RM, PPO at each fixed beta; the final held-out gold against KL is the trade-off.
rounds (InstructGPT, Ouyang et al. 2022; Bai et al. 2022): after a PPO segment the same simulated raters
  compare the current policy's samples, the RM is retrained on old + new pairs, and PPO continues from the
  current policy (train_rm.py --policy_dir --extra_prefs, train_ppo.py --init_policy). Compared with
  continuing on the first RM for the same iterations: held-out gold, and how well the RM that trained the
  policy agrees with the gold judge on the policy's own samples.

The training scripts run as subprocesses with the study's settings (--preset etc.), each into its own
folder under out_dir (its console output in stdout.log there). A finished run with the same flags is
reused, so a study can be rerun or extended; delete the folder to start over. --parallel N trains N of a
study's runs at a time, one thread each (on a CPU two side by side beat one on both cores; rounds is a chain
and stays one at a time). Writes to out_dir:
  overoptimization.png/.json   per PPO iteration: sqrt(KL), proxy reward (as PPO sees it: the no-EOS penalty
                               for unended responses), gold ± s.e.; per n of best-of-n the same; the fits
                               (alpha, beta, R²) and the peak test; one panel per bias
  bon_samples.pt               the best-of-n SFT samples, reused while SFT and the settings stay
  beta_sweep.png/.json         per beta: held-out gold (± s.e.), KL, proxy reward, win rate vs SFT
  rounds.png/.json             per round, with and without new preferences: gold, KL, RM-vs-gold agreement
  guard.png/.json              per PPO reward (one RM, ensemble mean, mean - lambda std, min): gold vs sqrt(KL),
                               the gold peak and each monitor's warning; false alarms of an unbiased run
                               (nanorlhf/ensemble_study.py, docs/ensembles.md)
"""
import dataclasses
import functools
import math
import os
import sys
import time

import numpy as np
import torch

from nanorlhf import ensemble_study, studies
from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_model
from nanorlhf.config import CommonConfig, StudyConfig, parse_config, print_config
from nanorlhf.data import load_corpus, split_prompt, train_val_stories
from nanorlhf.evaluate import best_of_n_blocks, best_of_n_kl, evaluate_policy, fit_goodhart, mean_se, peak_vs_final
from nanorlhf.judge import gold_scores
from nanorlhf.metrics import read_metrics, spearman
from nanorlhf.reward import normalised_scores
from nanorlhf.runtime import setup_runtime
from nanorlhf.sampler import sample_responses
from nanorlhf.studies import final_eval, plot_beta_sweep, plot_overoptimization, plot_rounds, save_json

STUDIES = ("overoptimization", "beta_sweep", "rounds", "guard")
BIASES = ("none", "length", "flowery", "sycophancy")
SMOOTH = 5  # iterations per window of the peak-and-fall test on the noisy per-iteration gold

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
@functools.cache
def sft():
    """The study's own SFT run (made again if its settings changed); a given --sft_dir is used as it is."""
    if not cfg.sft_dir:
        run_stage("train_sft.py", sft_dir)
    return sft_dir


def run_stage(script, out_dir, **flags):
    return studies.run_stage(script, out_dir, {**common, **flags})


def run_stages(jobs):
    """[(script, out_dir, flags)], --parallel at a time."""
    studies.run_stages([(script, out_dir, {**common, **flags}) for script, out_dir, flags in jobs], cfg.parallel)


def rm_job(bias, out_dir=None, **flags):
    """An RM trained on raters with this bias (flags: policy_dir, extra_prefs for later rounds)."""
    return "train_rm.py", out_dir or os.path.join(cfg.out_dir, f"rm_{bias}"), dict(
        sft_dir=sft(), rater_bias="" if bias == "none" else bias, rater_bias_weight=cfg.rater_bias_weight, **flags)


def ppo_job(out_dir, rm_dir, kl_coef, iterations=None, init_policy=""):
    """PPO with a fixed KL coefficient (no adaptive controller)."""
    return "train_ppo.py", out_dir, dict(sft_dir=sft(), rm_dir=rm_dir, init_kl_coef=kl_coef, adaptive_kl=False,
                                         iterations=iterations or cfg.iterations, eval_prompts=cfg.eval_prompts,
                                         init_policy=init_policy)


def reward_model(bias, out_dir=None, **flags):
    script, out_dir, flags = rm_job(bias, out_dir, **flags)
    return run_stage(script, out_dir, **flags)


def ppo(out_dir, rm_dir, kl_coef, iterations=None, init_policy=""):
    script, out_dir, flags = ppo_job(out_dir, rm_dir, kl_coef, iterations, init_policy)
    return run_stage(script, out_dir, **flags)


# ---------------------------------------------------------------- the studies
def bon_samples():
    """cfg.bon_max SFT samples for each of cfg.bon_prompts held-out prompts (a prompt's side by side), drawn once
    for every bias; kept in out_dir/bon_samples.pt while the SFT checkpoint and the sampling settings stay."""
    try:
        sft_model, enc, sft_ckpt = load_model(sft(), "sft", rt.device, fits=cfg)
    except CheckpointError as e:
        raise SystemExit(str(e))
    _, val_stories = train_val_stories(load_corpus(cfg.dataset))
    prompts = [split_prompt(val_stories[i % len(val_stories)])[0] for i in range(cfg.bon_prompts)]
    prompts = [p for p in prompts for _ in range(cfg.bon_max)]  # (P * N,)
    key = {"sft": os.path.getmtime(ckpt_path(sft())), "prompts": prompts, "seed": cfg.seed,
           **{k: getattr(cfg, k) for k in ("temperature", "max_prompt_tokens", "max_new_tokens")}}
    path = os.path.join(cfg.out_dir, "bon_samples.pt")
    saved = torch.load(path, map_location=rt.device, weights_only=True) if os.path.exists(path) else None
    if saved is not None and saved["key"] == key:
        print(f"best-of-n: the {len(prompts)} SFT samples in {path} (same SFT model and settings)")
    else:
        t0 = time.time()
        sampled = sample_responses(sft_model.eval(), enc, prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                                   cfg.temperature, batch_size=cfg.sample_batch,
                                   generator=torch.Generator(rt.device).manual_seed(cfg.seed + 2))
        saved = {"key": key, "texts": sampled["texts"], "ended": sampled["ended"], "batches": sampled["batches"]}
        torch.save(saved, path)
        print(f"best-of-n: sampled {cfg.bon_max} SFT responses for each of {cfg.bon_prompts} held-out prompts "
              f"in {time.time() - t0:.0f} s", flush=True)
    saved["gold"] = gold_scores(prompts, saved["texts"], saved["ended"])
    return saved, sft_ckpt


def best_of_n(rm_dir, samples, sft_ckpt):
    """Best-of-n for n = 1, 2, 4 .. bon_max on the biased RM, ranked by the reward PPO sees (the no-EOS penalty
    for unended responses); each n from the disjoint blocks of n of every prompt's samples. Per n: the analytic
    KL, and the mean (± s.e. over prompts) of the picks' proxy reward and gold."""
    rm, _, rm_ckpt = load_model(rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
    rewards = normalised_scores(rm.eval(), rm_ckpt["gain"], rm_ckpt["bias"], samples["batches"], rt).numpy()
    proxy = np.where(samples["ended"], rewards, cfg.no_eos_penalty)  # (P * N,)
    points = {k: [] for k in ("n", "kl", "sqrt_kl", "proxy", "proxy_se", "gold", "gold_se")}
    for n in [2 ** k for k in range(int(math.log2(cfg.bon_max)) + 1)]:
        for key, values in (("proxy", proxy), ("gold", samples["gold"])):
            m, se = mean_se(best_of_n_blocks(proxy, values, cfg.bon_max, n))  # over prompts
            points[key].append(m)
            points[f"{key}_se"].append(se)
        points["n"].append(n)
        points["kl"].append(best_of_n_kl(n))
        points["sqrt_kl"].append(math.sqrt(best_of_n_kl(n)))
    return points


def goodhart_fits(c):
    """Gao et al. (2022)'s forms fitted to the gain over SFT, gold(d) - gold(0) and the proxy's: SFT's values are
    best-of-1's (all bon samples) when there are any, else the first PPO iteration's (its rollouts are SFT's)."""
    bon = c.get("best_of_n")
    c["baseline"] = ({"from": "best-of-n, n = 1", "proxy": bon["proxy"][0], "gold": bon["gold"][0]} if bon else
                     {"from": "PPO iteration 1", "proxy": c["proxy_reward"][0], "gold": c["gold"][0]})
    fits = {}
    for form, points in (("rl", {"sqrt_kl": c["sqrt_kl"], "proxy": c["proxy_reward"], "gold": c["gold"]}),
                         ("bon", bon)):
        for key in ("proxy", "gold") if points else ():
            gain = np.asarray(points[key]) - c["baseline"][key]
            fits[f"{form}_{key}"] = fit_goodhart(form, points["sqrt_kl"], gain)
    return fits


def print_curve(bias, c):
    print(f"bias {bias}: PPO at beta {cfg.kl_coef:g} | iteration | sqrt KL | proxy | gold ± s.e. (of its rollouts)")
    for it, d, r, g, se in zip(c["iteration"], c["sqrt_kl"], c["proxy_reward"], c["gold"], c["gold_se"]):
        print(f"  {it} | {d:.2f} | {r:.3f} | {g:.3f} ± {se if se is not None else float('nan'):.3f}")
    if c.get("best_of_n"):
        b = c["best_of_n"]
        print(f"bias {bias}: best-of-n from SFT on {cfg.bon_prompts} held-out prompts | n | sqrt KL | proxy | gold ± s.e.")
        for n, d, r, g, se in zip(b["n"], b["sqrt_kl"], b["proxy"], b["gold"], b["gold_se"]):
            print(f"  {n} | {d:.2f} | {r:.3f} | {g:.3f} ± {se:.3f}")
    for name, f in c["fits"].items():
        form, key = name.split("_")
        print(f"  {'RL' if form == 'rl' else 'best-of-n'} {key}: alpha {f['alpha']:.3f} beta {f['beta']:.3f} "
              f"R² {f['r2']:.3f}")
    for name in ("peak", "peak_samples"):
        p = c.get(name)
        if p:
            print(f"  PPO gold, means over {p['window']} iterations: peak {p['peak']:.3f} ± {p['peak_se']:.3f} "
                  f"(iterations {c['iteration'][p['peak_end']] - p['window'] + 1}-{c['iteration'][p['peak_end']]}) "
                  f"vs final {p['final']:.3f} ± {p['final_se']:.3f}: drop {p['drop']:.3f} = {p['z']:.1f} s.e. "
                  f"(s.e. from the {'spread of the iterations' if p['se_from'] == 'spread' else 'rollouts'})")


def overoptimization():
    samples, sft_ckpt = bon_samples() if cfg.bon_max else (None, None)
    rms = {bias: rm_job(bias) for bias in biases}
    ppos = {bias: ppo_job(os.path.join(cfg.out_dir, f"ppo_{bias}_kl{cfg.kl_coef:g}_it{cfg.iterations}"),
                          rms[bias][1], cfg.kl_coef) for bias in biases}
    run_stages(list(rms.values()))  # --parallel at a time
    run_stages(list(ppos.values()))
    curves = {}
    for bias in biases:
        rm_dir, ppo_dir = rms[bias][1], ppos[bias][1]
        steps = [r for r in read_metrics(os.path.join(ppo_dir, "metrics.jsonl")) if "gold" in r and "kl" in r]
        curves[bias] = c = {"ppo_dir": ppo_dir, "rm_dir": rm_dir, "iteration": [r["step"] for r in steps],
                            "kl": [r["kl"] for r in steps], "sqrt_kl": [math.sqrt(max(r["kl"], 0.0)) for r in steps],
                            "proxy_reward": [r["reward"] for r in steps], "gold": [r["gold"] for r in steps],
                            "gold_se": [r.get("gold_se") for r in steps], "final_eval": final_eval(ppo_dir)}
        if samples is not None:
            c["best_of_n"] = best_of_n(rm_dir, samples, sft_ckpt)
        c["fits"] = goodhart_fits(c)
        if len(c["gold"]) >= SMOOTH:  # did gold peak and fall? (the windows' s.e. two ways)
            c["peak"] = peak_vs_final(c["gold"], SMOOTH)
            if all(se is not None for se in c["gold_se"]):
                c["peak_samples"] = peak_vs_final(c["gold"], SMOOTH, se=c["gold_se"])
        print_curve(bias, c)
    save_json(os.path.join(cfg.out_dir, "overoptimization.json"), {"kl_coef": cfg.kl_coef, "iterations": cfg.iterations, "window": SMOOTH,
                                        "bon_max": cfg.bon_max, "bon_prompts": cfg.bon_prompts, "curves": curves})
    plot_overoptimization(curves, cfg.kl_coef, os.path.join(cfg.out_dir, "overoptimization.png"))


def beta_sweep():
    betas = [float(b) for b in cfg.betas.split(",") if b.strip()]
    rms = {bias: rm_job(bias) for bias in biases}
    ppos = {(bias, beta): ppo_job(os.path.join(cfg.out_dir, f"ppo_{bias}_kl{beta:g}_it{cfg.iterations}"),
                                  rms[bias][1], beta) for bias in biases for beta in betas}
    run_stages(list(rms.values()))  # --parallel at a time
    run_stages(list(ppos.values()))
    points = []
    for bias in biases:
        for beta in betas:
            ppo_dir = ppos[bias, beta][1]
            e = final_eval(ppo_dir)
            points.append({"bias": bias, "beta": beta, "ppo_dir": ppo_dir, "gold": e["eval_gold_ppo"],
                           "gold_se": e["eval_gold_ppo_se"], "kl": e["eval_kl"], "reward": e["eval_reward_ppo"],
                           "win_rate": e["eval_win_rate"], "sft_gold": e["eval_gold_sft"], "final_eval": e})
            print(f"bias {bias} | beta {beta:g} | held-out gold {e['eval_gold_ppo']:.3f} "
                  f"± {e['eval_gold_ppo_se']:.3f} "
                  f"(SFT {e['eval_gold_sft']:.3f}) | KL {e['eval_kl']:.2f} | reward {e['eval_reward_ppo']:.3f} | "
                  f"win rate {e['eval_win_rate']:.3f} | words {e['eval_length_ppo']:.0f} | distinct-2 "
                  f"{e['eval_distinct2_ppo']:.3f} | RM-gold agreement {e['eval_rm_gold_acc_ppo']:.3f}")
    save_json(os.path.join(cfg.out_dir, "beta_sweep.json"), {"iterations": cfg.iterations, "points": points})
    plot_beta_sweep(points, biases, cfg.iterations, os.path.join(cfg.out_dir, "beta_sweep.png"))


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
    save_json(os.path.join(cfg.out_dir, "rounds.json"), {"rounds": cfg.rounds, "kl_coef": cfg.kl_coef, "report": report})
    plot_rounds(report, segment, cfg.rounds, cfg.kl_coef, os.path.join(cfg.out_dir, "rounds.png"))


def guard():
    ensemble_study.run(cfg, sft(), run_stages, biases, lambda bias: {**common, **rm_job(bias)[2]}, smooth=SMOOTH)


{"overoptimization": overoptimization, "beta_sweep": beta_sweep, "rounds": rounds, "guard": guard}[study]()
