"""DPO: the policy learns from preference pairs directly, with no reward model and no sampling.

python train_dpo.py                    # the pairs train_rm.py labelled (out/rm/prefs.jsonl), from out/sft
python train_dpo.py --prefs my.jsonl   # your own {"prompt", "chosen", "rejected"} rows
python train_dpo.py --beta 0.5         # a stronger pull towards the SFT policy
python train_dpo.py --resume           # continue out/dpo/ckpt.pt

Rafailov et al. 2023: the implicit reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) put
into the Bradley-Terry model gives a classification loss on the pairs themselves.
Reads top to bottom: config -> policy and frozen reference -> preference pairs -> DPO training -> save.
"""
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from nanorlhf.checkpoint import CheckpointError, load_model, load_resume, rng_state, save_checkpoint
from nanorlhf.config import DPOConfig, parse_config, print_config
from nanorlhf.distributed import all_reduce_mean, epoch_batch, finish_ddp, global_mean_denominator, unwrap
from nanorlhf.dpo import dpo_loss
from nanorlhf.judge import gold_score
from nanorlhf.metrics import plot_metrics, print_samples
from nanorlhf.model import response_logprobs
from nanorlhf.optim import backward, make_optimizer, optimizer_step, set_lr, warmup_lr
from nanorlhf.prefs import PreferenceFileError, prefs_digest, read_prefs, split_by_prompt
from nanorlhf.reward import encode_pairs, group_rows, ranked_right, response_ids
from nanorlhf.runtime import end_loop, end_step, for_training, guarded_sample, make_guard, restore, setup_runtime, \
    start_loop
from nanorlhf.sampler import sample_responses

EVALS_PER_RUN = 10  # validation, a sample and a checkpoint this many times per run (and at the end)
EVAL_PAIRS = 256  # pairs scored at each evaluation (validation, and a train subset): accuracy to about ±3%

cfg = parse_config(DPOConfig, "dpo", description=__doc__)
rt = setup_runtime(cfg, writes=True)  # out_dir/.lock: one run per folder
if rt.is_main:
    print_config(cfg)
    print(f"device {rt.device} | precision {rt.dtype} | processes {rt.world_size}")

# ---------------------------------------------------------------- policy and frozen reference, both the SFT model
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device, fits=cfg)
    reference, _, _ = load_model(cfg.sft_dir, "sft", rt.device)
    resume_ckpt = load_resume(cfg, "dpo", policy.config)  # None without --resume
except CheckpointError as e:
    raise SystemExit(str(e))
reference.eval().requires_grad_(False)  # pi_ref is never stepped (docs/design.md, detail 9)
max_response = policy.config.block_size - cfg.max_prompt_tokens  # longer responses are cut to fit the model

# ---------------------------------------------------------------- preference pairs
prefs_path = cfg.prefs or os.path.join(cfg.rm_dir, "prefs.jsonl")
if not cfg.prefs and not os.path.exists(prefs_path):
    raise SystemExit(f"no preference pairs at {prefs_path} — run `python train_rm.py` first (it labels SFT "
                     f"samples with simulated raters and writes them there), or pass --prefs FILE.jsonl")
try:
    rows = read_prefs(prefs_path)
except PreferenceFileError as e:
    raise SystemExit(str(e))
digest = prefs_digest(rows)  # a resumed run checks that it trains on the same pairs
# responses longer than the model can hold after the prompt are cut; a pair whose two responses are the same
# after the cut states no preference the policy could learn (its loss stays log 2), so it is dropped
full = [(response_ids(enc, r, "chosen", None), response_ids(enc, r, "rejected", None)) for r in rows]
n_cut = sum(len(c) > max_response or len(j) > max_response for c, j in full)
kept = [r for r, (c, j) in zip(rows, full) if c[:max_response] != j[:max_response]]
if n_cut and rt.is_main:
    print(f"{n_cut} of {len(rows)} pairs have a response longer than {max_response} tokens (block_size "
          f"{policy.config.block_size} - max_prompt_tokens {cfg.max_prompt_tokens}): cut to fit")
if len(kept) < len(rows) and rt.is_main:
    print(f"{len(rows) - len(kept)} pairs have the same two responses (after the cut): dropped")
rows = kept
if not rows:
    raise SystemExit(f"{prefs_path}: no pair with two different responses to learn from")
train_rows, val_rows, _ = split_by_prompt(rows, cfg.val_fraction, np.random.default_rng(cfg.seed))  # whole prompts
if not train_rows:
    raise SystemExit(f"{prefs_path} has {len(group_rows(rows))} prompt(s): too few to hold some out; label more pairs")
val_eval_rows = val_rows[:EVAL_PAIRS]  # whole prompts first: the rows of a group are adjacent
train_eval_rows = train_rows[:len(val_eval_rows)]  # a train subset as large, to compare the two
sample_prompt = next((r["prompt"] for r in val_rows if r["prompt"]), "Once upon a time")  # shown every eval
if rt.is_main:
    print(f"{len(rows)} pairs from {prefs_path}: {len(train_rows)} train / {len(val_rows)} validation "
          f"({len(val_eval_rows)} of each scored at every evaluation)")

# ---------------------------------------------------------------- optimizer, resume
optimizer = make_optimizer(policy, cfg.lr, 0.0, rt.device)  # no weight decay: it would pull away from pi_ref
eval_every = max(1, cfg.max_iters // EVALS_PER_RUN)
step = 0
guard = make_guard(cfg, rt, {"lr": cfg.lr})
if resume_ckpt is not None:  # weights, Adam moments, RNGs; the data order follows the step
    if resume_ckpt.get("prefs_digest") != digest:
        raise SystemExit(f"--resume: the preference pairs in {prefs_path} are not the ones the checkpoint was "
                         f"trained on; restore them, or start a new run without --resume")
    step = restore(resume_ckpt, rt, guard, {"model": policy, "optimizer": optimizer})
policy.grad_checkpoint = cfg.grad_checkpoint
policy = for_training(policy, cfg, rt)  # the training forward (--compile, DDP); sampling uses the plain module


def mean(x):
    return float(all_reduce_mean(x.float().mean(), rt))


def batch_of(batch_rows):
    return encode_pairs(enc, batch_rows, cfg.max_prompt_tokens, max_response, rt.device)


def sequence_logps(model, batch):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the real tokens of chosen and rejected -> (B,), (B,).
    One forward pass of 2B rows, both responses right-padded to a common width (mask 0 there)."""
    prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask = batch
    width = max(chosen.size(1), rejected.size(1))
    pad = lambda t: F.pad(t, (0, width - t.size(1)))
    with rt.autocast():  # the forward in bf16/fp16; the log-softmax and the sums in fp32 (logprobs_from_logits)
        logprobs = response_logprobs(model, prompt.repeat(2, 1), prompt_mask.repeat(2, 1),
                                     torch.cat([pad(chosen), pad(rejected)]),
                                     torch.cat([pad(chosen_mask), pad(rejected_mask)]), cfg.temperature)  # (2B, N)
    return logprobs.sum(1).chunk(2)


def pair_losses(batch):
    """DPO losses (B,) and the implicit rewards of chosen and rejected (B,), (B,)."""
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(reference, batch)  # once per batch: pi_ref never changes
    policy_chosen, policy_rejected = sequence_logps(policy, batch)
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta)


@torch.no_grad()
def evaluate(eval_rows):
    """Loss, reward accuracy and reward margin over eval_rows, weighted as in training."""
    policy.eval()
    losses, accuracy, margins = [], [], []
    for i in range(0, len(eval_rows), cfg.batch_size):
        batch_losses, chosen_rewards, rejected_rewards = pair_losses(batch_of(eval_rows[i:i + cfg.batch_size]))
        losses += batch_losses.tolist()
        accuracy += ranked_right(chosen_rewards, rejected_rewards).tolist()
        margins += (chosen_rewards - rejected_rewards).tolist()
    policy.train()
    weights = [r["weight"] for r in eval_rows]
    return tuple(float(np.average(x, weights=weights)) for x in (losses, accuracy, margins))


def print_continuation(prompt):
    """A held-out prompt, the policy's continuation, its implicit reward and its gold score.
    The same random draws every time, so the change comes from the policy."""
    generator = torch.Generator(rt.device).manual_seed(cfg.seed)
    sampled = sample_responses(unwrap(policy), enc, [prompt], cfg.max_prompt_tokens, cfg.max_new_tokens, rt,
                               cfg.temperature, generator=generator)
    b = sampled["batches"][0]
    with torch.no_grad(), rt.autocast():
        logps = [response_logprobs(m, b["prompt"], b["prompt_mask"], b["tokens"], b["mask"], cfg.temperature).sum()
                 for m in (unwrap(policy), reference)]
    print_samples([{"prompt": prompt, "response": sampled["texts"][0],
                    "implicit_reward": cfg.beta * float(logps[0] - logps[1]),  # beta * log(pi / pi_ref)
                    "gold": gold_score(prompt, sampled["texts"][0], sampled["ended"][0])}])


def save(step):
    model = unwrap(policy)
    save_checkpoint(cfg.out_dir, {
        "stage": "dpo", "model": model.state_dict(), "model_config": {**asdict(model.config), "dropout": 0.0},
        "config": asdict(cfg), "tokenizer": sft_ckpt["tokenizer"], "step": step,
        "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict() if rt.scaler else {},
        "rng": rng_state(), "prefs": prefs_path,
        "prefs_digest": digest})


# ---------------------------------------------------------------- DPO training
policy.train()
run = start_loop(cfg, rt, guard, step, resumed=resume_ckpt is not None)  # metrics log, Ctrl-C: finish, save, exit
metrics = {}
t_last = time.time()
while step < cfg.max_iters:
    batch_rows = [train_rows[j] for j in epoch_batch(len(train_rows), cfg.batch_size, step, cfg.seed, rt)]
    lr = warmup_lr(cfg.lr, step, cfg.max_iters)
    set_lr(optimizer, lr)
    weights = torch.tensor([r["weight"] for r in batch_rows], device=rt.device)
    losses, chosen_rewards, rejected_rewards = pair_losses(batch_of(batch_rows))
    # weighted mean (a prompt's C(k,2) pairs count as one) over the pairs of every rank, in fp32
    loss = (losses * weights).sum() / global_mean_denominator(weights.sum(), rt)
    backward(loss, rt)
    finite, grad_norm = optimizer_step(policy, optimizer, rt, cfg.grad_clip)
    step += 1
    metrics = {"loss": float(all_reduce_mean(loss.detach(), rt)),
               "acc": mean(ranked_right(chosen_rewards, rejected_rewards)),
               "margin": mean(chosen_rewards - rejected_rewards), "chosen_reward": mean(chosen_rewards),
               "rejected_reward": mean(rejected_rewards), "lr": lr, "grad_norm": grad_norm}
    guard.check(step, metrics["loss"], finite, rt.scaler)  # a bad step was skipped; stops after max_bad_steps
    if step % eval_every == 0 or step == cfg.max_iters:
        metrics["train_loss"], metrics["train_acc"], metrics["train_margin"] = evaluate(train_eval_rows)
        metrics["val_loss"], metrics["val_acc"], metrics["val_margin"] = evaluate(val_eval_rows)
    metrics["time_s"] = time.time() - t_last
    t_last = time.time()
    end_step(run, step, metrics, save, log_due=step % cfg.log_every == 0 or "val_acc" in metrics,
             save_due="val_acc" in metrics, finite=(metrics.get("val_loss", 0.0),))
    if "val_acc" in metrics and rt.is_main:
        guarded_sample(run, step, lambda: print_continuation(sample_prompt))  # not while the steps are bad
end_loop(run)

if rt.is_main:
    plot_metrics(run.log.path, [["loss", "train_loss", "val_loss"], ["acc", "train_acc", "val_acc"],
                            ["margin", "train_margin", "val_margin"]], os.path.join(cfg.out_dir, "dpo.png"),
                 f"DPO (beta {cfg.beta}): loss, reward accuracy, reward margin")
    if "val_acc" in metrics:
        print(f"reward accuracy: train {metrics['train_acc']:.3f} / validation {metrics['val_acc']:.3f} | "
              f"reward margin: train {metrics['train_margin']:.3f} / validation {metrics['val_margin']:.3f}")
    print(f"saved {cfg.out_dir}/ckpt.pt, metrics.jsonl, dpo.png")
finish_ddp()
