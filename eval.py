"""Evaluate every method on the same held-out prompts with the same random draws, and rank them.

python eval.py                                       # out/sft, out/ppo, out/dpo and best-of-1, 4, 16 from out/sft
python eval.py --ckpts out/ppo,out/study/ppo_length_kl0.01 --bon 16
python eval.py --preset tiny --sft_dir /tmp/sft --rm_dir /tmp/rm --ckpts /tmp/ppo --bon 1,2
python eval.py --ckpts out/ppo --rlaif_ckpts out/cai/ppo --labeler rules   # RLHF beside RLAIF (docs/constitution.md)

Columns (mean ± standard error over prompts):
  gold      the gold judge (nanorlhf/judge.py), what people really want; no method ever sees it
  reward    the reward model's score, normalised to mean 0, std 1 on SFT samples: what PPO maximised
  kl        KL(policy || SFT) in nats per response: sum of log pi - log pi_ref over the sampled tokens;
            for best-of-n the analytic log n - (n - 1) / n (Stiennon et al. 2020)
  win rate  share of prompts where the gold judge prefers the method's response to SFT's (ties 1/2)
  words     response length; ended: share that emitted <|endoftext|>; distinct-2: unique word bigrams
  rm-gold   share of pairs of the method's own responses that the RM orders as the gold judge does
  LM loss   held-out language-modelling loss on the validation stories SFT validated on (nats/token): its
            rise over SFT's is the alignment tax (best-of-n samples SFT: SFT's loss)
With --rlaif_ckpts or --labeler: on each method's (response, SFT response) pairs, the AI labeller's agreement with
gold, the simulated raters' on the same pairs, and the constitution's principles that disagree with gold most.
Best-of-1 draws exactly the SFT samples (same seed): its row equals SFT's, a check of the set-up.
Writes out_dir/results.json (every row, the settings, side-by-side samples) and results.md (the table).
"""
import json
import os
import textwrap

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_model, load_policy
from nanorlhf.config import EvalConfig, parse_config, print_config
from nanorlhf.constitution import ConstitutionError, format_agreement, gold_agreement, load_feedback_model, \
    make_labeller, raters_gold_agreement
from nanorlhf.data import load_corpus, split_prompt, train_val_stories
from nanorlhf.evaluate import agreement, evaluate_best_of_n, evaluate_policy, format_row, heldout_lm_loss
from nanorlhf.raters import make_rater_pool
from nanorlhf.runtime import setup_runtime

WIDTH = 100  # console width of the side-by-side samples

cfg = parse_config(EvalConfig, "eval", description=__doc__)
rt = setup_runtime(cfg)
print_config(cfg)

# ---------------------------------------------------------------- reference policy, reward model, prompts
try:
    reference, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device, fits=cfg)
    rm, _, rm_ckpt = load_model(cfg.rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
except CheckpointError as e:
    raise SystemExit(str(e))
reference.eval().requires_grad_(False)
rm.eval().requires_grad_(False)
gain, bias = rm_ckpt["gain"], rm_ckpt["bias"]
try:
    _, val_stories = train_val_stories(load_corpus(cfg.dataset))
except (OSError, ValueError, RuntimeError) as e:
    raise SystemExit(str(e))
prompts = [split_prompt(val_stories[i % len(val_stories)])[0] for i in range(cfg.n_prompts)]  # as train_ppo's


def same_draws():
    """Every method gets the same random numbers (seed + 1, as train_ppo.py's final evaluation)."""
    return torch.Generator(rt.device).manual_seed(cfg.seed + 1)


# ---------------------------------------------------------------- every method on the same prompts
print(f"{len(prompts)} held-out prompts | temperature {cfg.temperature} | max_new_tokens {cfg.max_new_tokens}")
results, skipped = [], []  # results: dicts of method, source, row, samples
sft_row, sft_samples = evaluate_policy(reference, reference, rm, gain, bias, enc, prompts, cfg, rt, same_draws())
sft_row["lm_loss"] = heldout_lm_loss(reference, enc, cfg.dataset, rt)
results.append({"method": "sft", "source": cfg.sft_dir, "row": sft_row, "samples": sft_samples})
split = lambda flag: [d.strip() for d in flag.split(",") if d.strip()]
for ckpt_dir, rlaif in [(d, False) for d in split(cfg.ckpts)] + [(d, True) for d in split(cfg.rlaif_ckpts)]:
    if os.path.realpath(ckpt_dir) == os.path.realpath(cfg.sft_dir):
        continue  # the reference is evaluated above
    if not os.path.exists(ckpt_path(ckpt_dir)):
        print(f"note: no checkpoint at {ckpt_path(ckpt_dir)}; skipping it")
        skipped.append(ckpt_dir)
        continue
    try:
        policy, _, ckpt = load_policy(ckpt_dir, rt.device, tokenizer_of=sft_ckpt, flag="--ckpts")
    except CheckpointError as e:
        raise SystemExit(str(e))
    policy.eval()
    stage = ckpt["stage"]
    name = os.path.basename(os.path.normpath(ckpt_dir))
    name = name if stage in name else f"{stage}:{name}"
    name = f"rlaif-{name}" if rlaif else name
    if any(r["method"] == name for r in results):
        name = ckpt_dir
    row, samples = evaluate_policy(policy, reference, rm, gain, bias, enc, prompts, cfg, rt, same_draws(),
                                   baseline_gold=sft_samples["gold"])
    row["lm_loss"] = heldout_lm_loss(policy, enc, cfg.dataset, rt)
    results.append({"method": name, "source": ckpt_dir, "row": row, "samples": samples})
    print(format_row(name, row), flush=True)
for n in [int(x) for x in cfg.bon.split(",") if x.strip()]:
    row, samples = evaluate_best_of_n(reference, rm, gain, bias, enc, prompts, n, cfg, rt, same_draws(),
                                      baseline_gold=sft_samples["gold"])
    row["lm_loss"] = sft_row["lm_loss"]  # SFT's own samples: the model is SFT's
    results.append({"method": f"best-of-{n}", "source": f"{cfg.sft_dir} x {n}", "row": row, "samples": samples})
    print(format_row(f"best-of-{n}", row), flush=True)
ranked = sorted(results, key=lambda r: -r["row"]["gold"][0])

# ---------------------------------------------------------------- the AI labeller against gold, on the same pairs
labeler = cfg.labeler or ("rules" if cfg.rlaif_ckpts.strip() else "")
if labeler:
    try:
        feedback = load_feedback_model(cfg.labeler_dir or cfg.sft_dir, rt.device) if labeler == "lm" else (None, None)
        labeller = make_labeller(labeler, cfg.constitution, *feedback)
    except (CheckpointError, ConstitutionError) as e:
        raise SystemExit(str(e))
    # the labeller's and the raters' draws come from their own generators: the rows above are unchanged
    label_rng, rater_rng = np.random.default_rng(cfg.seed + 2), np.random.default_rng(cfg.seed + 3)
    print(f"\n{labeler} labeller ({cfg.constitution}) vs gold on each method's (response, SFT response) pairs:")
    for r in results[1:]:
        s, ref = r["samples"], sft_samples
        pairs = [(p, a, b, ae, be) for p, a, b, ae, be in zip(prompts, s["texts"], ref["texts"], s["ended"],
                                                              ref["ended"]) if a != b]
        if not pairs:
            continue
        p_first, principles = labeller.label(pairs, label_rng)
        rows = [{"prompt": p, "chosen": a, "rejected": b, "chosen_ended": ae, "rejected_ended": be,
                 "p_chosen": float(x), "principle": pr} for (p, a, b, ae, be), x, pr in zip(pairs, p_first, principles)]
        overall, per = gold_agreement(rows)
        r["row"].update(labeler_gold_acc=overall, raters_gold_acc=raters_gold_agreement(
            rows, make_rater_pool(5, 0.02, 0.2), rater_rng), labeler_pairs=len(rows),
            labeler_prefers_method=float(np.mean(p_first)),
            principles_disagreeing=[[k, a, n] for k, (a, n) in per.items()][:3])
        print(format_agreement(f"  {r['method']:<12} {len(rows)} pairs", overall, per) +
              f" | raters {r['row']['raters_gold_acc']:.3f} | P(method better) {np.mean(p_first):.3f}")

# ---------------------------------------------------------------- the table, the samples, the files
print(f"\nranked by gold score on {len(prompts)} held-out prompts:")
for r in ranked:
    print(format_row(r["method"], r["row"]))


def cell(row, key, digits=3):
    if key not in row:
        return "—"
    if key == "kl" and row.get("kl_analytic"):
        return f"{row['kl'][0]:.{digits}f} (analytic)"
    m, se = row[key]
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def ranked_sft_loss(ranked):
    return next(r["row"]["lm_loss"] for r in ranked if r["method"] == "sft")


def markdown_table(ranked):
    lines = ["| rank | method | gold | RM reward | KL to SFT | win rate vs SFT | words | ended | distinct-2 | "
             "RM-gold agreement | LM loss (tax) |", "|" + "---|" * 11]
    for i, r in enumerate(ranked, 1):
        row = r["row"]
        lines.append(f"| {i} | {r['method']} | {cell(row, 'gold')} | {cell(row, 'reward')} | {cell(row, 'kl')} | "
                     f"{cell(row, 'win_rate')} | {cell(row, 'length', 1)} | {row['ended']:.0%} | "
                     f"{row['distinct2']:.3f} | {agreement(row)} | {row['lm_loss']:.3f} "
                     f"({row['lm_loss'] - ranked_sft_loss(ranked):+.3f}) |")
    return lines


shown = [{"prompt": prompts[i], **{r["method"]: {"response": r["samples"]["texts"][i],
                                                 "gold": float(r["samples"]["gold"][i]),
                                                 "reward": float(r["samples"]["rewards"][i])} for r in ranked}}
         for i in range(min(cfg.n_samples, len(prompts)))]
print()
for sample in shown:
    print(textwrap.fill("PROMPT: " + sample["prompt"], WIDTH))
    for method, resp in ((k, v) for k, v in sample.items() if k != "prompt"):
        print(textwrap.fill(f"[{method}] gold {resp['gold']:.3f} | reward {resp['reward']:.3f} | {resp['response']}",
                            WIDTH, subsequent_indent="    "))
    print("-" * WIDTH)

os.makedirs(cfg.out_dir, exist_ok=True)
settings = {k: getattr(cfg, k) for k in ("sft_dir", "rm_dir", "n_prompts", "seed", "temperature", "max_prompt_tokens",
                                         "max_new_tokens", "no_eos_penalty", "preset")}
with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
    json.dump({"settings": settings, "skipped": skipped,
               "rows": [{"rank": i, "method": r["method"], "source": r["source"], **r["row"]}
                        for i, r in enumerate(ranked, 1)],
               "samples": shown}, f, indent=1)
md = ["# nanorlhf evaluation", "",
      f"{len(prompts)} held-out prompts (first sentences of validation stories), temperature {cfg.temperature}, "
      f"max_new_tokens {cfg.max_new_tokens}, the same random draws for every method (seed {cfg.seed + 1}). "
      f"Reference: `{cfg.sft_dir}`; reward model: `{cfg.rm_dir}`. Mean ± standard error over prompts; KL in nats "
      f"per response (sampled for policies, analytic log n - (n-1)/n for best-of-n).", "",
      *markdown_table(ranked), ""]
if skipped:
    md += [f"Skipped (no checkpoint): {', '.join(skipped)}", ""]
if labeler:
    md += [f"The {labeler} labeller ({cfg.constitution}) against gold on each method's (response, SFT response) pairs "
           f"(docs/constitution.md):", "",
           "| method | pairs | labeller-gold agreement | simulated raters-gold | P(method better), labeller | "
           "principles that disagree most |", "|" + "---|" * 6]
    md += [f"| {r['method']} | {r['row']['labeler_pairs']} | {r['row']['labeler_gold_acc']:.3f} | "
           f"{r['row']['raters_gold_acc']:.3f} | {r['row']['labeler_prefers_method']:.3f} | "
           + ", ".join(f"{k} {a:.2f} ({n})" for k, a, n in r['row']['principles_disagreeing']) + " |"
           for r in ranked if "labeler_gold_acc" in r["row"]]
    md += [""]
md += ["## Samples", ""]
for sample in shown:
    md += [f"**Prompt:** {sample['prompt']}", ""]
    md += [f"- **{k}** (gold {v['gold']:.3f}, reward {v['reward']:.3f}): {v['response']}"
           for k, v in sample.items() if k != "prompt"]
    md += [""]
with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
    f.write("\n".join(md))
print(f"saved {cfg.out_dir}/results.json and results.md")
