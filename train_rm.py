"""Stage 2 of RLHF: a reward model learned from pairwise preferences.

python train_rm.py                       # simulated raters compare SFT samples (needs out/sft)
python train_rm.py --rater_bias length   # raters with a hidden taste for long responses
python train_rm.py --prefs my.jsonl      # your own {"prompt", "chosen", "rejected"} rows

Reads top to bottom: config -> SFT policy -> preference pairs -> reward model ->
Bradley-Terry training -> normalisation on SFT samples -> report -> save.
"""
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, load_checkpoint, load_model, rng_state, save_checkpoint, \
    set_rng_state
from nanorlhf.config import RMConfig, parse_config, print_config, setup_runtime
from nanorlhf.data import load_corpus, split_prompt, train_val_stories
from nanorlhf.judge import gold_accuracy, gold_scores, inter_rater_agreement, label_pairs, make_rater_pool
from nanorlhf.metrics import MetricsLog, plot_metrics, print_samples, spearman
from nanorlhf.model import ScalarGPT
from nanorlhf.prefs import PreferenceFileError, read_prefs, write_prefs
from nanorlhf.reward import bradley_terry_loss, encode_pairs, normaliser, pair_scores, score
from nanorlhf.sampler import sample_responses
from nanorlhf.train import all_reduce_mean, backward, make_optimizer, optimizer_step, unwrap, wrap_ddp

cfg = parse_config(RMConfig, "rm", description=__doc__)
rt = setup_runtime(cfg)
if rt.is_main:
    print_config(cfg)
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device)
except CheckpointError as e:
    raise SystemExit(str(e))
resume_ckpt = load_checkpoint(cfg.out_dir, "rm") if cfg.resume else None
generator = torch.Generator(rt.device).manual_seed(cfg.seed)  # every sample this stage draws
max_response = cfg.max_new_tokens + 1

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
    print(f"read {len(rows)} preference pairs from {cfg.prefs}")
elif resume_ckpt is not None:
    rows = read_prefs(prefs_path)  # the pairs the interrupted run labelled
else:
    t0 = time.time()
    prompts = [train_prompts[i % len(train_prompts)] for i in rng.permutation(max(cfg.n_prompts, 1))]
    prompts = prompts[:cfg.n_prompts]
    sampled = sample_responses(policy, enc, [p for p in prompts for _ in range(cfg.k_responses)],
                               cfg.max_prompt_tokens, cfg.max_new_tokens, rt, cfg.temperature,
                               generator=generator)
    k = cfg.k_responses
    group = lambda xs: [xs[i * k:(i + 1) * k] for i in range(len(prompts))]
    raters = make_rater_pool(cfg.n_raters, cfg.rater_noise_low, cfg.rater_noise_high,
                             cfg.rater_bias or None, cfg.rater_bias_weight)
    rows = label_pairs(prompts, group(sampled["texts"]), group(sampled["ended"]), raters, rng, k)
    agreement = inter_rater_agreement(raters, [(r["chosen"], r["rejected"], r["chosen_ended"], r["rejected_ended"])
                                               for r in rows], rng, n=min(len(rows), 500))
    print(f"sampled {len(sampled['texts'])} SFT responses ({time.time() - t0:.1f} s, "
          f"{np.mean(sampled['ended']):.0%} ended) -> {len(rows)} pairs from {len(raters)} raters "
          f"(noise {cfg.rater_noise_low}..{cfg.rater_noise_high}, bias {cfg.rater_bias or 'none'}) | "
          f"inter-rater agreement {agreement:.3f}")
    if rt.is_main:
        write_prefs(prefs_path, rows)
groups = sorted({r.get("group", i) for i, r in enumerate(rows)})
val_groups = set(rng.permutation(groups)[:max(1, int(len(groups) * cfg.val_fraction))].tolist())
val_rows = [r for i, r in enumerate(rows) if r.get("group", i) in val_groups]
train_rows = [r for i, r in enumerate(rows) if r.get("group", i) not in val_groups]
print(f"{len(train_rows)} train / {len(val_rows)} validation pairs")

# ---------------------------------------------------------------- reward model, from the SFT weights
model = ScalarGPT(policy.config).to(rt.device)
model.gpt.load_state_dict(policy.state_dict())
optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt.device)
steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
total_steps = steps_per_epoch * cfg.epochs
step = 0
if resume_ckpt is not None:
    model.load_state_dict(resume_ckpt["model"])
    optimizer.load_state_dict(resume_ckpt["optimizer"])
    step = resume_ckpt["step"]
    set_rng_state(resume_ckpt["rng"], generator)
    print(f"resumed at step {step}")
model = wrap_ddp(model, rt)


def batch_of(batch_rows):
    return encode_pairs(enc, batch_rows, cfg.max_prompt_tokens, max_response, rt.device)


@torch.no_grad()
def evaluate(eval_rows):
    model.eval()
    losses, hits = [], []
    for i in range(0, len(eval_rows), cfg.batch_size):
        with rt.autocast():
            r_c, r_r = pair_scores(model, batch_of(eval_rows[i:i + cfg.batch_size]))
        losses.append(float(bradley_terry_loss(r_c, r_r)) * len(r_c))
        hits += (r_c > r_r).float().tolist()
    model.train()
    return sum(losses) / len(hits), float(np.mean(hits))


# ---------------------------------------------------------------- Bradley-Terry training
log = MetricsLog(cfg.out_dir, resume=cfg.resume, enabled=rt.is_main)
model.train()
t_last = time.time()
while step < total_steps:
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_rows))  # the same on every rank
    batch_rows = [train_rows[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]][rt.rank::rt.world_size]
    lr = cfg.lr * min(1.0, (step + 1) / max(1, total_steps // 10))  # warmup over the first tenth, then flat
    for g in optimizer.param_groups:
        g["lr"] = lr
    weights = torch.tensor([r["weight"] for r in batch_rows], device=rt.device)
    with rt.autocast():
        r_c, r_r = pair_scores(model, batch_of(batch_rows))
    loss = bradley_terry_loss(r_c, r_r, weights)
    backward(loss, rt)
    finite, grad_norm = optimizer_step(model, optimizer, rt, cfg.grad_clip)
    step += 1
    metrics = {"loss": float(all_reduce_mean(loss.detach(), rt)),
               "acc": float(all_reduce_mean((r_c > r_r).float().mean(), rt)), "lr": lr, "grad_norm": grad_norm}
    if step % steps_per_epoch == 0 or step == total_steps:
        metrics["val_loss"], metrics["val_acc"] = evaluate(val_rows)
    metrics["time_s"] = time.time() - t_last
    t_last = time.time()
    if step % cfg.log_every == 0 or "val_acc" in metrics:
        log.log(step, **metrics)

# ---------------------------------------------------------------- normalise on SFT samples, then report
rm = unwrap(model).eval()


@torch.no_grad()
def rm_scores(sampled, gain=1.0, bias=0.0):
    out = []
    for b in sampled["batches"]:
        with rt.autocast():
            out.append(score(rm, b["prompt"], b["prompt_mask"], b["tokens"], b["mask"]))
    return gain * torch.cat(out).cpu() + bias


norm_prompts = [train_prompts[i % len(train_prompts)] for i in range(cfg.norm_samples)]
norm_sampled = sample_responses(policy, enc, norm_prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                                cfg.temperature, generator=generator)
gain, bias = normaliser(rm_scores(norm_sampled))
eval_prompts = [val_prompts[i % len(val_prompts)] for i in range(cfg.eval_samples)]
fresh = sample_responses(policy, enc, eval_prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                         cfg.temperature, generator=generator)
rewards = rm_scores(fresh, gain, bias).numpy()
gold = gold_scores(fresh["texts"], fresh["ended"])
lengths = np.array([len(t.split()) for t in fresh["texts"]])
val_loss, val_acc = evaluate(val_rows)
gold_acc = gold_accuracy(val_rows)
report = {"val_acc": val_acc, "gold_acc": gold_acc, "acc_ratio": val_acc / gold_acc,
          "spearman_rm_gold": spearman(rewards, gold), "spearman_rm_length": spearman(rewards, lengths),
          "spearman_gold_length": spearman(gold, lengths), "gain": gain, "bias": bias}
if rt.is_main:
    log.log(step, **report)
    print(f"held-out pairwise accuracy: RM {val_acc:.3f} vs gold judge {gold_acc:.3f} on the same noisy labels "
          f"(ratio {val_acc / gold_acc:.2f})")
    print(f"on {len(gold)} fresh SFT samples: Spearman(RM, gold) {report['spearman_rm_gold']:.3f} | "
          f"correlation with length: RM {report['spearman_rm_length']:.3f}, gold {report['spearman_gold_length']:.3f}")
    example = val_rows[0]
    with torch.no_grad():
        r_c, r_r = (gain * x + bias for x in pair_scores(rm, batch_of([example])))
    print("an example held-out pair:")
    print_samples([{"prompt": example["prompt"], "response": "[CHOSEN] " + example["chosen"],
                    "reward": float(r_c), "gold": float(gold_scores([example["chosen"]], [example.get("chosen_ended", True)])[0])},
                   {"prompt": example["prompt"], "response": "[REJECTED] " + example["rejected"],
                    "reward": float(r_r), "gold": float(gold_scores([example["rejected"]], [example.get("rejected_ended", True)])[0])}])
    save_checkpoint(cfg.out_dir, {
        "stage": "rm", "model": rm.state_dict(), "model_config": asdict(rm.gpt.config), "config": asdict(cfg),
        "tokenizer": sft_ckpt["tokenizer"], "step": step, "optimizer": optimizer.state_dict(),
        "rng": rng_state(generator), "gain": gain, "bias": bias, "report": report,
        "prefs": cfg.prefs or prefs_path})
    plot_metrics(log.path, [["acc", "val_acc"], ["loss", "val_loss"]], os.path.join(cfg.out_dir, "accuracy.png"),
                 "reward model: pairwise accuracy and Bradley-Terry loss")
    print(f"saved {cfg.out_dir}/ckpt.pt, prefs.jsonl, metrics.jsonl, accuracy.png")
if rt.world_size > 1:
    torch.distributed.destroy_process_group()
