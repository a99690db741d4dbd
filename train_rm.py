"""Stage 2 of RLHF: a reward model learned from pairwise preferences.

python train_rm.py                       # simulated raters compare SFT samples (needs out/sft)
python train_rm.py --rater_bias length   # raters with a hidden taste for long responses
python train_rm.py --prefs my.jsonl      # your own {"prompt", "chosen", "rejected"} rows
python train_rm.py --policy_dir out/ppo --extra_prefs out/rm/prefs.jsonl   # iterated RLHF: a new round
python train_rm.py --feedback constitution --labeler rules   # RLAIF: an AI labeller reads data/constitution.md

Reads top to bottom: config -> SFT policy -> preference pairs -> reward model ->
Bradley-Terry training -> normalisation on SFT samples -> report -> save.
"""
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, load_model, load_resume, rng_state, save_checkpoint
from nanorlhf.constitution import ConstitutionError, format_agreement, gold_agreement, label_pairs_ai, \
    load_feedback_model, make_labeller, parse_clamp, raters_gold_agreement
from nanorlhf.config import RMConfig, parse_config, print_config
from nanorlhf.data import load_corpus, split_prompt, train_val_stories
from nanorlhf.judge import gold_score, gold_scores
from nanorlhf.raters import Rater, bias_bonus, gold_accuracy, inter_rater_agreement, label_pairs, make_rater_pool
from nanorlhf.ensemble import bootstrap_groups, calibration, finish_ensemble, member_split, random_head, \
    sample_lengths
from nanorlhf.distributed import all_gather_lists, all_reduce_mean, epoch_batch, finish_ddp, global_mean_denominator
from nanorlhf.metrics import plot_metrics, print_samples, spearman
from nanorlhf.model import ScalarGPT
from nanorlhf.optim import backward, make_optimizer, optimizer_step, set_lr, warmup_lr
from nanorlhf.prefs import PreferenceFileError, prefs_digest, read_prefs, split_by_prompt, write_prefs
from nanorlhf.reward import bradley_terry_loss, encode_groups, group_rows, group_scores, normalised_scores, \
    normaliser, pair_targets, ranked_right, soft_bradley_terry_loss
from nanorlhf.runtime import end_loop, end_step, for_training, make_guard, next_path, restore, save_step, \
    setup_runtime, start_loop
from nanorlhf.sampler import sample_responses

cfg = parse_config(RMConfig, "rm", description=__doc__)
rt = setup_runtime(cfg, writes=True)  # out_dir/.lock: one run per folder
if rt.is_main:
    print_config(cfg)
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device, fits=cfg)
    sft_state = policy.state_dict()  # the reward model starts from the SFT weights
    if cfg.policy_dir:  # iterated RLHF: raters compare a later policy's samples; the RM is normalised on them too
        policy = load_model(cfg.policy_dir, "ppo", rt.device, tokenizer_of=sft_ckpt, flag="--policy_dir")[0]
    resume_ckpt = load_resume(cfg, "rm", policy.config)  # None without --resume
except CheckpointError as e:
    raise SystemExit(str(e))
generator = torch.Generator(rt.device).manual_seed(cfg.seed + rt.rank)  # every sample this stage draws
# a response and its <|endoftext|>, cut so that prompt + response fits the model (long --prefs rows)
max_response = min(cfg.max_new_tokens + 1, policy.config.block_size - cfg.max_prompt_tokens)

# ---------------------------------------------------------------- preference pairs
try:
    text = load_corpus(cfg.dataset)
    train_stories, val_stories = train_val_stories(text)
except (OSError, ValueError, RuntimeError) as e:  # missing, empty or undownloadable corpus
    raise SystemExit(str(e))
train_prompts = [split_prompt(s)[0] for s in train_stories]
val_prompts = [split_prompt(s)[0] for s in val_stories]
prefs_path = os.path.join(cfg.out_dir, "prefs.jsonl")
rng = np.random.default_rng(cfg.seed)
if cfg.prefs:
    try:
        rows = read_prefs(cfg.prefs)  # all-or-nothing: a broken row stops the run before it starts
    except PreferenceFileError as e:
        raise SystemExit(str(e))
    if rt.is_main:
        print(f"read {len(rows)} preference pairs from {cfg.prefs}")
        if os.path.abspath(cfg.prefs) != os.path.abspath(prefs_path):  # beside the RM, where train_dpo.py reads them
            write_prefs(next_path(prefs_path), rows)  # in place at the first checkpoint (runtime.save_step)
elif resume_ckpt is not None:
    try:
        rows = read_prefs(prefs_path)  # the pairs the interrupted run labelled
    except PreferenceFileError as e:
        raise SystemExit(f"--resume: {e}")
else:
    t0 = time.time()
    prompts = [train_prompts[i % len(train_prompts)] for i in rng.permutation(max(cfg.n_prompts, 1))]
    prompts = prompts[:cfg.n_prompts]
    k = cfg.k_responses
    # each rank samples the k responses of its own share of the prompts; then every rank holds them all
    share = prompts[rt.rank * len(prompts) // rt.world_size:(rt.rank + 1) * len(prompts) // rt.world_size]
    sampled = sample_responses(policy, enc, [p for p in share for _ in range(k)],
                               cfg.max_prompt_tokens, cfg.max_new_tokens, rt, cfg.temperature,
                               batch_size=cfg.sample_batch, generator=generator)
    texts, ended = all_gather_lists(sampled["texts"], rt), all_gather_lists(sampled["ended"], rt)
    group = lambda xs: [xs[i * k:(i + 1) * k] for i in range(len(prompts))]
    raters = make_rater_pool(cfg.n_raters, cfg.rater_noise_low, cfg.rater_noise_high,
                             cfg.rater_bias or None, cfg.rater_bias_weight)
    if cfg.feedback == "constitution":  # RLAIF: the AI labeller's soft labels, one principle drawn per pair
        t1 = time.time()
        try:
            feedback_model = feedback_enc = None
            if cfg.labeler == "lm":
                feedback_model, feedback_enc = load_feedback_model(cfg.labeler_dir or cfg.sft_dir, rt.device)
            labeller = make_labeller(cfg.labeler, cfg.constitution, feedback_model, feedback_enc,
                                     cfg.label_swap, parse_clamp(cfg.label_clamp))
        except (CheckpointError, ConstitutionError) as e:
            raise SystemExit(str(e))
        rows = label_pairs_ai(prompts, group(texts), group(ended), labeller, rng, k)
        if rt.is_main:
            print(f"{cfg.labeler} labeller on {len(rows)} pairs ({time.time() - t1:.1f} s): "
                  f"mean P(chosen) {np.mean([r['p_chosen'] for r in rows]):.3f}")
            print(format_agreement("  the labeller", *gold_agreement(rows)))
            print(f"  the simulated raters on the same pairs: agreement with gold "
                  f"{raters_gold_agreement(rows, raters, np.random.default_rng(cfg.seed + 1)):.3f}")
    elif cfg.feedback != "raters":
        raise SystemExit(f"--feedback must be raters or constitution, got {cfg.feedback!r}")
    else:
        rows = label_pairs(prompts, group(texts), group(ended), raters, rng, k)
    agreement = inter_rater_agreement(raters, [(r["prompt"], r["chosen"], r["rejected"], r["chosen_ended"],
                                                r["rejected_ended"]) for r in rows], rng, n=min(len(rows), 500))
    if rt.is_main and cfg.feedback == "constitution":
        print(f"sampled {len(texts)} {cfg.policy_dir or 'SFT'} responses ({np.mean(ended):.0%} ended) -> "
              f"{len(rows)} pairs labelled under {cfg.constitution} by the {cfg.labeler} labeller")
    elif rt.is_main:
        print(f"sampled {len(texts)} {cfg.policy_dir or 'SFT'} responses ({time.time() - t0:.1f} s, "
              f"{np.mean(ended):.0%} ended) -> {len(rows)} pairs from {len(raters)} raters "
              f"(noise {cfg.rater_noise_low}..{cfg.rater_noise_high}, bias {cfg.rater_bias or 'none'}) | "
              f"inter-rater agreement {agreement:.3f}")
    if cfg.extra_prefs:  # iterated RLHF: the earlier rounds' pairs too, their groups numbered after the new ones
        try:
            old_rows = read_prefs(cfg.extra_prefs)
        except PreferenceFileError as e:
            raise SystemExit(str(e))
        rows += [{**r, "group": len(prompts) + r.get("group", i)} for i, r in enumerate(old_rows)]
        if rt.is_main:
            print(f"+ {len(old_rows)} pairs of earlier rounds from {cfg.extra_prefs}")
    if rt.is_main:
        write_prefs(next_path(prefs_path), rows)  # in place at the first checkpoint: the old RM keeps its pairs
digest = prefs_digest(rows)
if resume_ckpt is not None and resume_ckpt.get("prefs_digest") != digest:
    raise SystemExit(f"--resume: the preference pairs in {cfg.prefs or prefs_path} are not the ones the checkpoint "
                     f"was trained on; restore them, or start a new run without --resume")
train_rows, val_rows, val_groups = split_by_prompt(  # a resumed run keeps the interrupted run's split
    rows, cfg.val_fraction, rng, set(resume_ckpt["val_groups"]) if resume_ckpt is not None else member_split(cfg))
train_batches, val_batches = group_rows(train_rows), group_rows(val_rows)  # a prompt's pairs stay together
soft = any("p_chosen" in r for r in rows)  # soft labels (an AI labeller's): the soft Bradley-Terry loss
if cfg.bootstrap:  # an ensemble member's own resample of the training prompts (docs/ensembles.md)
    train_batches = bootstrap_groups(train_batches, cfg.seed)
if not train_rows or not val_rows:
    raise SystemExit(f"{len(rows)} preference pairs in {len(group_rows(rows))} prompt group(s) give "
                     f"{len(train_rows)} to train on and {len(val_rows)} to validate: label more prompts (--n_prompts), "
                     f"check --val_fraction, or sample more varied responses (identical responses make no pair)")
if rt.is_main and soft:
    print("soft labels (p_chosen): the Bradley-Terry loss takes them as its targets (reward.soft_bradley_terry_loss)")
if rt.is_main:
    print(f"{len(train_rows)} train / {len(val_rows)} validation pairs "
          f"({len(train_batches)} / {len(val_batches)} prompts)")

# ---------------------------------------------------------------- reward model, from the SFT weights
model = ScalarGPT(policy.config).to(rt.device)  # fp32 master weights; autocast runs the matrix products
model.gpt.load_state_dict(sft_state)
if cfg.ensemble > 1 or cfg.member:  # an ensemble member: a head of its own seed (a lone RM's starts at 0)
    random_head(model, cfg.seed)
model.gpt.grad_checkpoint = cfg.grad_checkpoint
optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt.device)
steps_per_epoch = math.ceil(len(train_batches) / cfg.batch_size)
total_steps = steps_per_epoch * cfg.epochs
step = 0
guard = make_guard(cfg, rt, {"lr": cfg.lr})
if resume_ckpt is not None:  # weights, Adam moments, the sampler's generator (the data order follows the step)
    step = restore(resume_ckpt, rt, guard, {"model": model, "optimizer": optimizer}, generator)
rm = model  # the plain module: scoring after training uses it
model = for_training(model, cfg, rt)  # the training forward (--compile, DDP)


def batch_of(groups):
    """Each response of these prompts' comparisons once, and the pairs as indices (encode_groups)."""
    return encode_groups(enc, groups, cfg.max_prompt_tokens, max_response, rt.device)


@torch.no_grad()
def evaluate(eval_groups):
    """Mean Bradley-Terry loss and accuracy over all the pairs of these groups, unweighted."""
    model.eval()
    losses, hits = [], []
    for i in range(0, len(eval_groups), cfg.batch_size):
        groups = eval_groups[i:i + cfg.batch_size]
        with rt.autocast():
            r_c, r_r = group_scores(model, batch_of(groups))
        loss = soft_bradley_terry_loss(r_c, r_r, pair_targets(groups, rt.device)) if soft else \
            bradley_terry_loss(r_c, r_r)
        losses.append(float(loss) * len(r_c))
        hits += ranked_right(r_c, r_r).tolist()
    model.train()
    return sum(losses) / len(hits), float(np.mean(hits))


def save(step, **finished):
    """A checkpoint to resume training from; the finished one adds the normaliser and the report."""
    save_checkpoint(cfg.out_dir, {
        "stage": "rm", "model": rm.state_dict(), "model_config": asdict(rm.gpt.config),
        "config": asdict(cfg), "tokenizer": sft_ckpt["tokenizer"], "step": step,
        "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict() if rt.scaler else {},
        "rng": rng_state(generator), "prefs": cfg.prefs or prefs_path,
        "prefs_digest": digest, "val_groups": sorted(val_groups, key=str), **finished})


# ---------------------------------------------------------------- Bradley-Terry training
model.train()
run = start_loop(cfg, rt, guard, step, resumed=resume_ckpt is not None)  # metrics log, Ctrl-C: finish, save, exit
t_last = time.time()
while step < total_steps:
    groups = [train_batches[j] for j in epoch_batch(len(train_batches), cfg.batch_size, step, cfg.seed, rt)]
    batch = batch_of(groups)
    lr = warmup_lr(cfg.lr, step, total_steps)
    set_lr(optimizer, lr)
    weights = batch[-1]  # 1 / C(k, 2) per pair: each prompt counts once
    with rt.autocast():
        r_c, r_r = group_scores(model, batch)
    # the BT loss in fp32 (score reads fp32 values); this rank's weighted sum over the global weight sum
    loss = soft_bradley_terry_loss(r_c, r_r, pair_targets(groups, rt.device), weights) if soft else \
        bradley_terry_loss(r_c, r_r, weights)
    loss = loss * weights.sum() / global_mean_denominator(weights.sum(), rt)
    backward(loss, rt)
    finite, grad_norm = optimizer_step(model, optimizer, rt, cfg.grad_clip)
    step += 1
    metrics = {"loss": float(all_reduce_mean(loss.detach(), rt)),
               "acc": float(all_reduce_mean(ranked_right(r_c, r_r).mean(), rt)), "lr": lr, "grad_norm": grad_norm}
    guard.check(step, metrics["loss"], finite, rt.scaler)  # a bad step was skipped; stops after max_bad_steps
    if step % steps_per_epoch == 0 or step == total_steps:
        metrics["val_loss"], metrics["val_acc"] = evaluate(val_batches)
    metrics["time_s"] = time.time() - t_last
    t_last = time.time()
    end_step(run, step, metrics, save, log_due=step % cfg.log_every == 0 or "val_acc" in metrics,
             save_due="val_acc" in metrics, finite=(metrics.get("val_loss", 0.0),))  # every epoch
end_loop(run)
train_rng = rng_state(generator)  # the finished checkpoint resumes into the same normalisation samples

# ---------------------------------------------------------------- normalise on SFT samples, then report
rm.eval()
norm_prompts = [train_prompts[i % len(train_prompts)] for i in range(cfg.norm_samples)]
norm_sampled = sample_responses(policy, enc, norm_prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                                cfg.temperature, batch_size=cfg.sample_batch, generator=generator)
raw = normalised_scores(rm, 1.0, 0.0, norm_sampled["batches"], rt)  # 1 * raw + 0: the raw scores
gain, bias = normaliser(raw)
if not (math.isfinite(gain) and math.isfinite(bias)) or float(raw.std()) < 1e-6:  # a constant or broken score
    raise SystemExit(f"the reward model gives the same score (std {float(raw.std()):.3g}) to all {len(raw)} "
                     f"normalisation samples: it learned nothing to rank them by, so it is not saved "
                     f"({guard.still_holds()}); check the preference pairs and --lr")
normed = gain * raw + bias  # what PPO will see on SFT samples: mean 0, std 1 (docs/design.md detail 11)
eval_prompts = [val_prompts[i % len(val_prompts)] for i in range(cfg.eval_samples)]
fresh = sample_responses(policy, enc, eval_prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                         cfg.temperature, batch_size=cfg.sample_batch, generator=generator)
rewards = normalised_scores(rm, gain, bias, fresh["batches"], rt).numpy()
gold = gold_scores(eval_prompts, fresh["texts"], fresh["ended"])
lengths = np.array([len(t.split()) for t in fresh["texts"]])
val_loss, val_acc = evaluate(val_batches)
gold_acc = gold_accuracy(val_rows)
report = {"val_acc": val_acc, "gold_acc": gold_acc, "acc_ratio": val_acc / gold_acc if gold_acc else float("nan"),
          "spearman_rm_gold": spearman(rewards, gold), "spearman_rm_length": spearman(rewards, lengths),
          "spearman_gold_length": spearman(gold, lengths), "gain": gain, "bias": bias,
          "norm_mean": float(normed.mean()), "norm_std": float(normed.std())}
if cfg.rater_bias in ("flowery", "sycophancy"):  # the taste itself, at full strength (length has its own line)
    taste = np.array([bias_bonus(Rater("taste", 1.0, cfg.rater_bias, 1.0), t) for t in fresh["texts"]])
    report.update({f"spearman_rm_{cfg.rater_bias}": spearman(rewards, taste),
                   f"spearman_gold_{cfg.rater_bias}": spearman(gold, taste)})
if rt.is_main:
    run.log.log(step, **report)
    print(f"reward normalised on {len(normed)} {cfg.policy_dir or 'SFT'} samples: gain {gain:.3f}, bias {bias:.3f} "
          f"-> mean {report['norm_mean']:.3f}, std {report['norm_std']:.3f}")
    print(f"held-out pairwise accuracy: RM {val_acc:.3f} vs gold judge {gold_acc:.3f} on the same noisy labels "
          f"(ratio {report['acc_ratio']:.2f})")
    print(f"on {len(gold)} fresh {cfg.policy_dir or 'SFT'} samples: Spearman(RM, gold) {report['spearman_rm_gold']:.3f} | "
          f"correlation with length: RM {report['spearman_rm_length']:.3f}, gold {report['spearman_gold_length']:.3f}")
    if f"spearman_rm_{cfg.rater_bias}" in report:
        print(f"correlation with the raters' hidden taste ({cfg.rater_bias}): "
              f"RM {report[f'spearman_rm_{cfg.rater_bias}']:.3f}, gold {report[f'spearman_gold_{cfg.rater_bias}']:.3f}")
    example = val_rows[0]
    with torch.no_grad():
        r_c, r_r = (gain * x + bias for x in group_scores(rm, batch_of([[example]])))
    print("an example held-out pair:")
    print_samples([{"prompt": example["prompt"], "response": f"[{key.upper()}] " + example[key], "reward": float(r),
                    "gold": gold_score(example["prompt"], example[key], example.get(f"{key}_ended", True))}
                   for key, r in (("chosen", r_c), ("rejected", r_r))])
    save_step(run, lambda step: save(step, rng=train_rng, gain=gain, bias=bias, report=report,
                                   calibration=calibration(normed[None], sample_lengths(norm_sampled),
                                                           norm_sampled["texts"])), step)
    plot_metrics(run.log.path, [["acc", "val_acc"], ["loss", "val_loss"]], os.path.join(cfg.out_dir, "accuracy.png"),
                 "reward model: pairwise accuracy and Bradley-Terry loss")
    print(f"saved {cfg.out_dir}/ckpt.pt, prefs.jsonl, metrics.jsonl, accuracy.png")
    if cfg.ensemble > 1:  # members 1..K-1 in child processes, then all on the same normalisation samples
        finish_ensemble(cfg, asdict(cfg), (rm, gain, bias), norm_sampled, rt, sft_ckpt)
finish_ddp()
