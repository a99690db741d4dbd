"""Stage 3 of RLHF: PPO against the learned reward, with a KL leash to the SFT policy.

python train_ppo.py                 # the whole pipeline: trains out/sft and out/rm first if missing
python train_ppo.py --preset tiny   # seconds, for tests
python train_ppo.py --resume        # continue out/ppo/ckpt.pt

Each iteration: prompts -> rollout -> RM score -> reference logprobs and values ->
KL-shaped rewards -> GAE -> whitened advantages -> PPO epochs -> adaptive KL update.
All the math is in nanorlhf/ppo.py; this file is the loop (Ziegler et al. 2019,
Ouyang et al. 2022, and the details of Huang et al. 2023).
"""
import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_checkpoint, load_model, rng_state, \
    save_checkpoint, set_rng_state
from nanorlhf.config import CommonConfig, PPOConfig, parse_config, print_config, setup_runtime
from nanorlhf.data import encode_prompts, left_pad, load_corpus, split_prompt, train_val_stories
from nanorlhf.evaluate import evaluate_policy, format_row
from nanorlhf.judge import gold_scores
from nanorlhf.metrics import MetricsLog, plot_metrics, print_samples
from nanorlhf.model import ScalarGPT, join_prompt_response, logprobs_from_logits, response_logits
from nanorlhf.ppo import AdaptiveKLController, FixedKLController, compute_gae, entropy_from_logits, \
    explained_variance, kl_penalty_rewards, masked_mean, masked_whiten, policy_loss, value_loss
from nanorlhf.reward import score
from nanorlhf.sampler import generate
from nanorlhf.train import all_reduce_mean, backward, make_optimizer, optimizer_step, unwrap, wrap_ddp

cfg = parse_config(PPOConfig, "ppo", description=__doc__)
rt = setup_runtime(cfg)
if rt.is_main:
    print_config(cfg)

# ---------------------------------------------------------------- earlier stages, trained here if missing
common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig) if f.name not in ("out_dir", "resume")}
for stage, script, out_dir, extra in (("sft", "train_sft.py", cfg.sft_dir, []),
                                      ("rm", "train_rm.py", cfg.rm_dir, ["--sft_dir", cfg.sft_dir])):
    if not os.path.exists(ckpt_path(out_dir)) and rt.is_main:
        command = [sys.executable, script, "--out_dir", out_dir, *extra,
                   *[a for k, v in common.items() for a in (f"--{k}", str(v))]]
        print(f"no {stage} checkpoint at {ckpt_path(out_dir)}: training it first with the same settings:\n  "
              + " ".join(command[1:]), flush=True)
        if subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__))).returncode != 0:
            raise SystemExit(f"{script} failed; fix that stage first")
if rt.world_size > 1:
    torch.distributed.barrier()  # the other ranks wait for rank 0 to train the missing stages

# ---------------------------------------------------------------- models
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device)
    reference, _, _ = load_model(cfg.sft_dir, "sft", rt.device)
    rm, _, rm_ckpt = load_model(cfg.rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
except CheckpointError as e:
    raise SystemExit(str(e))
gain, bias = rm_ckpt["gain"], rm_ckpt["bias"]  # the RM's score on SFT samples is normalised to mean 0, std 1
value_model = ScalarGPT(rm.gpt.config).to(rt.device)
value_model.load_state_dict(rm.state_dict())  # the value model starts as the reward model ...
torch.nn.init.zeros_(value_model.head.weight)  # ... with its head at zero: it predicts 0 until it learns
torch.nn.init.zeros_(value_model.head.bias)
for frozen in (reference, rm):
    frozen.eval().requires_grad_(False)  # never stepped (DESIGN detail 9)
policy.train(), value_model.train()  # dropout is 0 in every loaded model, so train() only enables grads
policy_opt = make_optimizer(policy, cfg.lr, 0.0, rt.device)
value_opt = make_optimizer(value_model, cfg.value_lr, 0.0, rt.device)
kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
          else FixedKLController(cfg.init_kl_coef))
generator = torch.Generator(rt.device).manual_seed(cfg.seed + rt.rank)  # rollouts draw from this alone
data_rng = np.random.default_rng(cfg.seed)  # prompt order, the same on every rank
start = 0
if cfg.resume:
    ckpt = load_checkpoint(cfg.out_dir, "ppo")
    policy.load_state_dict(ckpt["model"])
    value_model.load_state_dict(ckpt["value_model"])
    policy_opt.load_state_dict(ckpt["optimizer"])
    value_opt.load_state_dict(ckpt["value_optimizer"])
    kl_ctl.load_state_dict(ckpt["kl_ctl"])
    data_rng.bit_generator.state = ckpt["data_rng"]
    set_rng_state(ckpt["rng"], generator)
    start = ckpt["step"]
    print(f"resumed from {ckpt_path(cfg.out_dir)} at iteration {start}")
policy_ddp, value_ddp = wrap_ddp(policy, rt), wrap_ddp(value_model, rt)

# ---------------------------------------------------------------- prompts
try:
    train_stories, val_stories = train_val_stories(load_corpus(cfg.dataset))
except (OSError, ValueError, RuntimeError) as e:  # missing, empty or undownloadable corpus
    raise SystemExit(str(e))
train_prompts = [split_prompt(s)[0] for s in train_stories]
eval_prompts = [split_prompt(val_stories[i % len(val_stories)])[0] for i in range(cfg.eval_prompts)]
per_rank = cfg.rollout_batch // rt.world_size
minibatch = per_rank // cfg.n_minibatches
if minibatch < 1:
    raise SystemExit(f"rollout_batch {cfg.rollout_batch} over {rt.world_size} processes and "
                     f"{cfg.n_minibatches} minibatches leaves no rows per minibatch")


def values_of(model, prompt, prompt_mask, response, response_mask):
    # V(s_t) for each response token t, read at the position that predicts it: (B, N)
    idx, mask, pos = join_prompt_response(prompt, prompt_mask, response, response_mask)
    return model(idx, position_ids=pos, attention_mask=mask)[:, prompt.size(1) - 1:-1].float()


def save(iteration):
    if rt.is_main:
        save_checkpoint(cfg.out_dir, {
            "stage": "ppo", "model": policy.state_dict(), "model_config": sft_ckpt["model_config"],
            "value_model": value_model.state_dict(), "config": asdict(cfg), "tokenizer": sft_ckpt["tokenizer"],
            "step": iteration, "optimizer": policy_opt.state_dict(), "value_optimizer": value_opt.state_dict(),
            "kl_ctl": kl_ctl.state_dict(), "rng": rng_state(generator), "data_rng": data_rng.bit_generator.state})


# ---------------------------------------------------------------- the PPO loop
log = MetricsLog(cfg.out_dir, resume=cfg.resume, enabled=rt.is_main)
for iteration in range(start, cfg.iterations):
    t0 = time.time()
    # 1. rollout: sample a response for each prompt of this rank's slice of the batch
    rows = data_rng.choice(len(train_prompts), cfg.rollout_batch, replace=False)[rt.rank::rt.world_size]
    prompts = [train_prompts[i] for i in rows]
    prompt, prompt_mask = left_pad(encode_prompts(enc, prompts, cfg.max_prompt_tokens), enc.eot_token, rt.device)
    policy.eval()
    with rt.autocast():
        rollout = generate(policy, prompt, prompt_mask, cfg.max_new_tokens, cfg.temperature,
                           eos_id=enc.eot_token, generator=generator)
    policy.train()
    response, mask = rollout["tokens"], rollout["mask"]  # (B, N): right padded, mask through the first EOS
    t1 = time.time()

    # 2. score: normalised RM reward at the last real token; a response that never ended gets a penalty
    # (DESIGN details 1, 2, 10). Then old and reference logprobs and old values, in the minibatches of
    # the first PPO epoch so that its first minibatch reproduces them exactly (detail 3).
    with torch.no_grad(), rt.autocast():
        ended = (response.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)) == enc.eot_token).squeeze(1)
        ended &= mask.sum(1) > 0
        scores = gain * score(rm, prompt, prompt_mask, response, mask) + bias
        scores = torch.where(ended, scores, torch.full_like(scores, cfg.no_eos_penalty))
        first_order = torch.randperm(per_rank, generator=generator, device=rt.device)
        old_logprobs, ref_logprobs, old_values = (torch.zeros_like(mask, dtype=torch.float) for _ in range(3))
        for mb in first_order.split(minibatch):
            args = (prompt[mb], prompt_mask[mb], response[mb], mask[mb])
            old_logprobs[mb] = logprobs_from_logits(response_logits(policy_ddp, *args), response[mb], cfg.temperature)
            ref_logprobs[mb] = logprobs_from_logits(response_logits(reference, *args), response[mb], cfg.temperature)
            old_values[mb] = values_of(value_ddp, *args)
        old_logprobs, ref_logprobs, old_values = old_logprobs * mask, ref_logprobs * mask, old_values * mask
        # 3. rewards, advantages: r_t = -beta * KL_t (+ score at the last token); GAE; whitening
        rewards = kl_penalty_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    t2 = time.time()

    # 4. learn: ppo_epochs passes of shuffled minibatches, clipped policy and value losses
    stats = []
    for epoch in range(cfg.ppo_epochs):
        order = first_order if epoch == 0 else torch.randperm(per_rank, generator=generator, device=rt.device)
        for mb in order.split(minibatch):
            args = (prompt[mb], prompt_mask[mb], response[mb], mask[mb])
            with rt.autocast():
                logits = response_logits(policy_ddp, *args)  # (b, N, V)
                values = values_of(value_ddp, *args)  # (b, N)
            # losses in fp32 (logprobs_from_logits and the ppo.py math upcast)
            new_logprobs = logprobs_from_logits(logits, response[mb], cfg.temperature)
            pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
            vf_loss, vf_stats = value_loss(values, old_values[mb], returns[mb], mask[mb], cfg.clip_range_value)
            backward(pg_loss + cfg.vf_coef * vf_loss, rt)
            optimizer_step(policy_ddp, policy_opt, rt, cfg.grad_clip)
            optimizer_step(value_ddp, value_opt, rt, cfg.grad_clip)
            with torch.no_grad():
                entropy = entropy_from_logits(logits.float() / cfg.temperature, mask[mb])
            stats.append({"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": entropy,
                          **pg_stats, **vf_stats})
    t3 = time.time()

    # 5. adaptive KL: move beta so that KL(pi || pi_ref) per response approaches target_kl
    kl = all_reduce_mean(((old_logprobs - ref_logprobs) * mask).sum(1).mean(), rt)
    kl_coef = kl_ctl.value
    kl_ctl.update(float(kl), cfg.rollout_batch)

    first = stats[0]
    mean_stats = {k: float(all_reduce_mean(torch.stack([s[k] for s in stats]).mean(), rt)) for k in first}
    texts = [enc.decode(r[:int(m.sum())].tolist()).replace("<|endoftext|>", "") for r, m in zip(response.cpu(), mask.cpu())]
    gold = gold_scores(texts, ended.tolist())
    metrics = {
        "reward": float(all_reduce_mean(scores.mean(), rt)), "gold": float(np.mean(gold)),
        "kl": float(kl), "kl_coef": kl_coef, "entropy": mean_stats["entropy"],
        "clipfrac": mean_stats["clipfrac"], "approx_kl": mean_stats["approx_kl"], "ratio": mean_stats["ratio"],
        "first_ratio": float(first["ratio"]), "value_loss": mean_stats["value_loss"],
        "explained_var": float(explained_variance(old_values, returns, mask)),
        "resp_len": float(mask.sum(1).float().mean()), "ended": float(ended.float().mean()),
        "t_rollout": t1 - t0, "t_score": t2 - t1, "t_learn": t3 - t2}
    log.log(iteration + 1, **metrics)
    if rt.is_main and ((iteration + 1) % cfg.sample_every == 0 or iteration == start):
        print_samples([{"prompt": p, "response": t, "reward": float(s), "gold": float(g)}
                       for p, t, s, g in list(zip(prompts, texts, scores.tolist(), gold))[:3]])
    if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations:
        save(iteration + 1)

# ---------------------------------------------------------------- final evaluation on held-out prompts
if rt.is_main:
    policy.eval()
    eval_gen = torch.Generator(rt.device).manual_seed(cfg.seed + 1)  # the same draws for every method
    sft_row, sft_samples = evaluate_policy(reference, reference, rm, gain, bias, enc, eval_prompts, cfg, rt, eval_gen)
    eval_gen = torch.Generator(rt.device).manual_seed(cfg.seed + 1)
    ppo_row, ppo_samples = evaluate_policy(policy, reference, rm, gain, bias, enc, eval_prompts, cfg, rt, eval_gen,
                                           baseline_gold=sft_samples["gold"])
    print(f"held-out evaluation on {len(eval_prompts)} prompts ({len(set(eval_prompts))} distinct):")
    print(format_row("SFT", sft_row))
    print(format_row("PPO", ppo_row))
    print_samples([{"prompt": p, "response": f"[PPO] {a}\n[SFT] {b}", "gold_ppo": ga, "gold_sft": gb}
                   for p, a, b, ga, gb in list(zip(eval_prompts, ppo_samples["texts"], sft_samples["texts"],
                                                   ppo_samples["gold"], sft_samples["gold"]))[:3]])
    log.log(cfg.iterations, eval_gold_sft=sft_row["gold"][0], eval_gold_sft_se=sft_row["gold"][1],
            eval_gold_ppo=ppo_row["gold"][0], eval_gold_ppo_se=ppo_row["gold"][1],
            eval_win_rate=ppo_row["win_rate"][0], eval_kl=ppo_row["kl"][0],
            eval_reward_sft=sft_row["reward"][0], eval_reward_ppo=ppo_row["reward"][0])
    plot_metrics(log.path, [["reward", "gold"], ["kl"], ["kl_coef"]], os.path.join(cfg.out_dir, "ppo.png"),
                 "PPO: proxy reward vs gold score, and KL to the reference")
    print(f"saved {cfg.out_dir}/ckpt.pt, metrics.jsonl, ppo.png")
if rt.world_size > 1:
    torch.distributed.destroy_process_group()
