"""Stage 3 of RLHF: PPO against the learned reward, with a KL leash to the SFT policy.

python train_ppo.py                 # the whole pipeline: trains out/sft and out/rm first if missing
python train_ppo.py --preset tiny   # seconds, for tests
python train_ppo.py --resume        # continue out/ppo/ckpt.pt
python train_ppo.py --init_policy out/ppo --rm_dir out/rm2 --out_dir out/ppo2   # iterated RLHF: a new round

Each iteration: prompts -> rollout -> RM score -> reference logprobs and values ->
KL-shaped rewards -> GAE -> whitened advantages -> PPO epochs -> adaptive KL update.
All the math is in nanorlhf/ppo.py; this file is the loop (Ziegler et al. 2019,
Ouyang et al. 2022, and the details of Huang et al. 2023).
"""
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_checkpoint, load_model, load_resume, rng_state, \
    save_checkpoint, set_rng_state
from nanorlhf.config import CommonConfig, PPOConfig, parse_config, print_config, setup_runtime
from nanorlhf.data import encode_prompts, left_pad, load_corpus, split_prompt, train_val_stories
from nanorlhf.evaluate import evaluate_policy, format_row
from nanorlhf.judge import gold_scores
from nanorlhf.metrics import MetricsLog, plot_metrics, print_samples
from nanorlhf.model import ScalarGPT, join_prompt_response, logprobs_from_logits, response_logits
from nanorlhf.ppo import AdaptiveKLController, FixedKLController, compute_gae, entropy_from_logits, \
    explained_variance, kl_penalty_rewards, last_token_index, masked_mean, masked_whiten, policy_loss, value_loss
from nanorlhf.reward import score
from nanorlhf.sampler import generate, make_decode_step
from nanorlhf.train import NonFiniteGuard, StopOnSignal, all_reduce_max, all_reduce_mean, backward, finish_ddp, \
    make_optimizer, optimizer_step, unwrap, wrap_ddp

cfg = parse_config(PPOConfig, "ppo", description=__doc__)
rt = setup_runtime(cfg)
if rt.is_main:
    print_config(cfg)

# ---------------------------------------------------------------- earlier stages, trained here if missing
common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig) if f.name not in ("out_dir", "resume")}
for stage, script, out_dir, extra in (("sft", "train_sft.py", cfg.sft_dir, []),
                                      ("rm", "train_rm.py", cfg.rm_dir, ["--sft_dir", cfg.sft_dir])):
    if not os.path.exists(ckpt_path(out_dir)) and rt.world_size > 1:
        # not inside a torchrun job: the child would join this job's rendezvous, and the other ranks
        # would wait for the whole stage at a barrier (NCCL gives up after 10 minutes)
        command = shlex.join(["torchrun", "--nproc_per_node", str(rt.world_size), script, "--preset", cfg.preset,
                              "--out_dir", out_dir, *extra])
        raise SystemExit(f"no {stage} checkpoint at {ckpt_path(out_dir)}: train it first:\n  {command}"
                         if rt.is_main else 1)  # the message once, from rank 0
    if not os.path.exists(ckpt_path(out_dir)):
        # the script next to this one, run in this directory: relative paths (out_dir, dataset) mean the same there
        path = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), script))
        command = [sys.executable, path, "--out_dir", out_dir, *extra,
                   *[a for k, v in common.items() for a in (f"--{k}", str(v))]]
        shown = shlex.join(["python", *command[1:]])
        print(f"no {stage} checkpoint at {ckpt_path(out_dir)}: training it first with the same settings:\n  {shown}",
              flush=True)
        # Ctrl-C belongs to the child meanwhile: it saves its checkpoint and stops (a Python handler,
        # unlike SIG_IGN, is not inherited, so the child gets its own)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        returncode = subprocess.run(command).returncode
        signal.signal(signal.SIGINT, previous)
        if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise SystemExit(f"{script} was stopped and saved its checkpoint; finish it with\n  "
                             f"{shown} --resume\nthen run this command again")
        if returncode != 0:
            raise SystemExit(f"{script} failed; fix that stage first")

# ---------------------------------------------------------------- models
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device, fits=cfg)
    if cfg.init_policy:  # iterated RLHF: continue from an earlier PPO policy; the reference stays SFT
        policy = load_model(cfg.init_policy, "ppo", rt.device, tokenizer_of=sft_ckpt, flag="--init_policy")[0]
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
guard = NonFiniteGuard(cfg.max_bad_steps, ckpt_path(cfg.out_dir), {"lr": cfg.lr, "value_lr": cfg.value_lr}, rt.dtype)
try:
    ckpt = load_resume(cfg, "ppo", policy.config)  # None without --resume
except CheckpointError as e:
    raise SystemExit(str(e))
if ckpt is not None:  # both models and optimizers, beta, the prompt order, the rollout generator, the RNGs
    policy.load_state_dict(ckpt["model"])
    value_model.load_state_dict(ckpt["value_model"])
    policy_opt.load_state_dict(ckpt["optimizer"])
    value_opt.load_state_dict(ckpt["value_optimizer"])
    if rt.scaler is not None and ckpt.get("scaler"):  # fp16: the loss scale it had reached
        rt.scaler.load_state_dict(ckpt["scaler"])
    kl_ctl.value = float(ckpt["kl_ctl"]["value"])  # beta as it was; its target and horizon as asked for now
    data_rng.bit_generator.state = ckpt["data_rng"]
    set_rng_state(ckpt["rng"], generator)
    start = ckpt["step"]
    if rt.rank > 0:  # the checkpoint holds rank 0's generator: the other ranks draw their own rollouts
        generator.manual_seed(cfg.seed + rt.rank + 1000 * start)
    for opt, lr in ((policy_opt, cfg.lr), (value_opt, cfg.value_lr)):  # the rates asked for now, not the saved ones
        for group in opt.param_groups:
            group["lr"] = lr
    guard.saved(start)
    if rt.is_main:
        print(f"resumed from {ckpt_path(cfg.out_dir)} at iteration {start}")
# the modules that train (and give the old logprobs and values): compiled with --compile, wrapped for DDP.
# Rollouts sample from the plain policy; all of them share the same fp32 master weights.
policy.grad_checkpoint = value_model.gpt.grad_checkpoint = cfg.grad_checkpoint
policy_ddp, value_ddp = (wrap_ddp(torch.compile(m, mode=cfg.compile_mode) if cfg.compile else m, rt)
                         for m in (policy, value_model))

# ---------------------------------------------------------------- prompts
try:
    train_stories, val_stories = train_val_stories(load_corpus(cfg.dataset))
except (OSError, ValueError, RuntimeError) as e:  # missing, empty or undownloadable corpus
    raise SystemExit(str(e))
train_prompts = [split_prompt(s)[0] for s in train_stories]
if cfg.rollout_batch > len(train_prompts):  # an iteration draws its prompts without replacement
    raise SystemExit(f"rollout_batch {cfg.rollout_batch} is more than the corpus's {len(train_prompts)} training "
                     f"prompts: lower it")
eval_prompts = [split_prompt(val_stories[i % len(val_stories)])[0] for i in range(cfg.eval_prompts)]
per_rank = cfg.rollout_batch // rt.world_size
minibatch = per_rank // cfg.n_minibatches
if cfg.rollout_batch % (rt.world_size * cfg.n_minibatches):  # every rank steps on as many equal minibatches
    raise SystemExit(f"rollout_batch {cfg.rollout_batch} must be a multiple of processes ({rt.world_size}) x "
                     f"n_minibatches ({cfg.n_minibatches})")


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
            "scaler": rt.scaler.state_dict() if rt.scaler else {},
            "kl_ctl": kl_ctl.state_dict(), "rng": rng_state(generator), "data_rng": data_rng.bit_generator.state})
    guard.saved(iteration)


# ---------------------------------------------------------------- the PPO loop
log = MetricsLog(cfg.out_dir, resume=cfg.resume, enabled=rt.is_main)
if ckpt is not None:
    log.keep_until(start)
# --compile: the rollout's decode step too, captured as a CUDA graph on GPU (one launch per token) or
# compiled on CPU. Its shapes must not change, so the prompts are padded to max_prompt_tokens: one
# graph for the whole run. The step reads the policy's weights in place, so it sees every update.
decode_step = make_decode_step(policy, "cuda_graph" if rt.device.type == "cuda" else "compile") if cfg.compile else None
stop = StopOnSignal()  # Ctrl-C: finish the iteration, save, exit
for iteration in range(start, cfg.iterations):
    t0 = time.time()
    # 1. rollout: sample a response for each prompt of this rank's slice of the batch
    rows = data_rng.choice(len(train_prompts), cfg.rollout_batch, replace=False)[rt.rank::rt.world_size]
    prompts = [train_prompts[i] for i in rows]
    prompt, prompt_mask = left_pad(encode_prompts(enc, prompts, cfg.max_prompt_tokens), enc.eot_token, rt.device,
                                   width=cfg.max_prompt_tokens if decode_step else None)
    policy.eval()
    with rt.autocast():
        rollout = generate(policy, prompt, prompt_mask, cfg.max_new_tokens, cfg.temperature,
                           eos_id=enc.eot_token, generator=generator, decode_step=decode_step)
    policy.train()
    response, mask = rollout["tokens"], rollout["mask"]  # (B, N): right padded, mask through the first EOS
    t1 = time.time()

    # 2. score: normalised RM reward at the last real token; a response that never ended gets a penalty
    # (DESIGN details 1, 2, 10). Then old and reference logprobs and old values, in the minibatches of
    # the first PPO epoch so that its first minibatch reproduces them exactly (detail 3).
    # autocast runs the forwards' matrix products in bf16/fp16; score, logprobs_from_logits and values_of
    # return fp32, so the KL, GAE and whitening arithmetic (elementwise and sums) stays fp32
    with torch.no_grad(), rt.autocast():
        last = last_token_index(mask)  # (B,), -1 for an empty response
        ended = (last >= 0) & (response.gather(1, last.clamp(min=0)[:, None]).squeeze(1) == enc.eot_token)
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
            # losses in fp32, outside autocast: logprobs_from_logits upcasts the logits, values_of the values
            new_logprobs = logprobs_from_logits(logits, response[mb], cfg.temperature)
            pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
            vf_loss, vf_stats = value_loss(values, old_values[mb], returns[mb], mask[mb], cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            backward(loss, rt)
            policy_finite = optimizer_step(policy_ddp, policy_opt, rt, cfg.grad_clip, update_scaler=False)[0]
            value_finite = optimizer_step(value_ddp, value_opt, rt, cfg.grad_clip)[0]  # fp16: one scaler update
            guard.check(iteration + 1, all_reduce_mean(loss.detach(), rt), policy_finite and value_finite, rt.scaler)
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
    gold = gold_scores(prompts, texts, ended.tolist())
    metrics = {
        "reward": float(all_reduce_mean(scores.mean(), rt)),
        "gold": float(all_reduce_mean(torch.tensor(np.mean(gold)), rt)),
        "kl": float(kl), "kl_coef": kl_coef, "entropy": mean_stats["entropy"],
        "clipfrac": mean_stats["clipfrac"], "approx_kl": mean_stats["approx_kl"], "ratio": mean_stats["ratio"],
        "first_ratio": float(first["ratio"]), "first_approx_kl": float(first["approx_kl"]),
        # the sampler's logprobs vs the teacher-forced pass: ~1e-6 when temperature and positions align
        "logprob_gap": float(all_reduce_max(((rollout["logprobs"] - old_logprobs).abs() * mask).max(), rt)),
        "value_loss": mean_stats["value_loss"],
        "explained_var": float(all_reduce_mean(explained_variance(old_values, returns, mask), rt)),  # ranks' mean
        "resp_len": float(all_reduce_mean(mask.sum(1).float().mean(), rt)),
        "ended": float(all_reduce_mean(ended.float().mean(), rt)),
        "t_rollout": t1 - t0, "t_score": t2 - t1, "t_learn": t3 - t2}
    if guard.skipped:
        metrics["skipped_steps"] = guard.skipped
    stopping = stop.requested(rt)
    if (iteration + 1) % cfg.log_every == 0 or iteration + 1 == cfg.iterations or stopping:
        log.log(iteration + 1, **metrics)
    if rt.is_main and ((iteration + 1) % cfg.sample_every == 0 or iteration == start):
        print_samples([{"prompt": p, "response": t, "reward": float(s), "gold": float(g)}
                       for p, t, s, g in list(zip(prompts, texts, scores.tolist(), gold))[:3]])
    if (((iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations) and guard.can_save()) or stopping:
        save(iteration + 1)
    if stopping:
        stop.exit(ckpt_path(cfg.out_dir), iteration + 1)
stop.release()

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
    rest_of_table = {f"eval_{k}_{name}": row[k][0] if isinstance(row[k], tuple) else row[k]  # means, not their s.e.
                     for name, row in (("sft", sft_row), ("ppo", ppo_row))
                     for k in ("rm_gold_acc", "distinct2", "length", "ended")}
    log.log(cfg.iterations, eval_gold_sft=sft_row["gold"][0], eval_gold_sft_se=sft_row["gold"][1],
            eval_gold_ppo=ppo_row["gold"][0], eval_gold_ppo_se=ppo_row["gold"][1],
            eval_win_rate=ppo_row["win_rate"][0], eval_kl=ppo_row["kl"][0],
            eval_reward_sft=sft_row["reward"][0], eval_reward_ppo=ppo_row["reward"][0],
            **rest_of_table,
            # DESIGN detail 9, checked on the real run: the reference is bit-identical to the SFT
            # checkpoint it was loaded from, and no model has an active dropout
            reference_unchanged=all(torch.equal(p, q) for p, q in zip(
                reference.state_dict().values(), load_checkpoint(cfg.sft_dir, "sft")["model"].values())),
            dropout_off=all(m.p == 0 for net in (policy, value_model, reference, rm) for m in net.modules()
                            if isinstance(m, torch.nn.Dropout)))
    plot_metrics(log.path, [["reward", "gold"], ["kl"], ["kl_coef"]], os.path.join(cfg.out_dir, "ppo.png"),
                 "PPO: proxy reward vs gold score, and KL to the reference")
    print(f"saved {cfg.out_dir}/ckpt.pt, metrics.jsonl, ppo.png")
finish_ddp()
