"""The critic-free policy-gradient methods of RLHF beside PPO: REINFORCE, RLOO, GRPO and Dr. GRPO.

python train_pg.py --algo rloo       # RLOO (Ahmadian et al. 2024): k samples a prompt, leave-one-out baseline
python train_pg.py --algo grpo       # GRPO (Shao et al. 2024): group-normalised advantages, k3 KL in the loss
python train_pg.py --algo drgrpo     # Dr. GRPO (Liu et al. 2025): no std division, no length normalisation
python train_pg.py --algo reinforce  # REINFORCE with a running-mean baseline
python train_pg.py --preset tiny     # seconds, for tests; --resume continues out/pg/ckpt.pt

Each iteration: rollout_batch / k prompts, each sampled k times -> RM score -> old and reference logprobs
-> one advantage per response (reward minus a baseline: no value model) -> epochs of the clipped loss.
The rollout, scoring and reference passes are PPO's (nanorlhf/ppo_step.py), the math nanorlhf/pg.py; the
same rollout budget as PPO: rollout_batch responses an iteration. docs/pg.md explains the choices.
The reward-hacking monitors and guards (--reward_ensemble, --stop_on_monitor) are PPO's: docs/ensembles.md.
"""
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, load_model, load_resume, rng_state, save_checkpoint
from nanorlhf.config import PGConfig, parse_config, print_config
from nanorlhf.data import encode_prompts, left_pad, load_prompts
from nanorlhf.distributed import finish_ddp
from nanorlhf.evaluate import compare_to_reference
from nanorlhf.metrics import plot_metrics, print_samples
from nanorlhf.monitors import StopOnMonitor, ensemble_reward, rl_monitors, require_ensemble, watch
from nanorlhf.optim import make_optimizer, set_lr
from nanorlhf.pg import RunningMeanBaseline
from nanorlhf.pg_step import group_prompts, kl_estimator_of, pg_advantages, pg_update
from nanorlhf.ppo_step import batch_sizes, iteration_metrics, old_and_reference_logprobs, rollout, rollout_kl, \
    score_responses
from nanorlhf.runtime import end_loop, end_step, for_training, make_guard, restore, save_step, setup_runtime, \
    start_loop, stop_if_diverged, train_missing_stages

cfg = parse_config(PGConfig, "pg", description=__doc__)
rt = setup_runtime(cfg, writes=True)  # out_dir/.lock: one run per folder
if rt.is_main:
    print_config(cfg)
require_ensemble(cfg)  # --reward_ensemble: refused here, not after training a missing RM that is not an ensemble
train_missing_stages(cfg, rt, ("sft", "rm"))

# ---------------------------------------------------------------- models: policy, reference, reward (no value model)
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device, fits=cfg)
    reference, _, _ = load_model(cfg.sft_dir, "sft", rt.device)
    rm, _, rm_ckpt = load_model(cfg.rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
    ckpt = load_resume(cfg, "pg", policy.config)  # None without --resume
    members, monitors = rl_monitors(cfg, rm, rm_ckpt, sft_ckpt, rt.device, ckpt)  # RM members, gold-free monitors
except CheckpointError as e:
    raise SystemExit(str(e))
gain, bias = rm_ckpt["gain"], rm_ckpt["bias"]  # the RM's score on SFT samples is normalised to mean 0, std 1
for frozen in (reference, rm):
    frozen.eval().requires_grad_(False)  # never stepped (docs/design.md, detail 9)
policy.train()
policy_opt = make_optimizer(policy, cfg.lr, 0.0, rt.device)
k, estimator = cfg.group_size, kl_estimator_of(cfg.algo, cfg.kl_estimator)
running_baseline = RunningMeanBaseline(cfg.baseline_decay)  # reinforce's; the group methods need none
generator = torch.Generator(rt.device).manual_seed(cfg.seed + rt.rank)  # rollouts draw from this alone
data_rng = np.random.default_rng(cfg.seed)  # prompt order, the same on every rank
guard = make_guard(cfg, rt, {"lr": cfg.lr})
start = 0
if ckpt is not None:  # the policy and its optimizer, the baseline, the prompt order, the rollout generator
    start = restore(ckpt, rt, guard, {"model": policy, "optimizer": policy_opt, "baseline": running_baseline},
                    generator, unit="iteration")
    data_rng.bit_generator.state = ckpt["data_rng"]
    if rt.rank > 0:
        generator.manual_seed(cfg.seed + rt.rank + 1000 * start)
    set_lr(policy_opt, cfg.lr)
policy.grad_checkpoint = cfg.grad_checkpoint
policy_train = for_training(policy, cfg, rt)
try:
    train_prompts, eval_prompts = load_prompts(cfg.dataset, cfg.eval_prompts)
except (OSError, ValueError, RuntimeError) as e:
    raise SystemExit(str(e))
n_groups = cfg.rollout_batch // k  # prompts per iteration, each sampled k times
if n_groups % rt.world_size:
    raise SystemExit(f"rollout_batch / group_size ({n_groups} prompts) must be a multiple of the {rt.world_size} "
                     f"processes: each takes whole groups")
per_rank, minibatch_size = batch_sizes(cfg.rollout_batch, cfg.n_minibatches, rt.world_size, len(train_prompts) * k)


def save(iteration):
    save_checkpoint(cfg.out_dir, {
        "stage": "pg", "model": policy.state_dict(), "model_config": sft_ckpt["model_config"],
        "config": asdict(cfg), "tokenizer": sft_ckpt["tokenizer"], "step": iteration,
        "optimizer": policy_opt.state_dict(), "scaler": rt.scaler.state_dict() if rt.scaler else {},
        "baseline": running_baseline.state_dict(), "rng": rng_state(generator),
        "data_rng": data_rng.bit_generator.state, "monitors": monitors.state_dict()})


# ---------------------------------------------------------------- the loop
run = start_loop(cfg, rt, guard, start, resumed=ckpt is not None)  # metrics log, Ctrl-C: finish, save, exit
stopper = StopOnMonitor(cfg.stop_on_monitor, start, policy)  # keeps the last clear policy
for iteration in range(start, cfg.iterations):
    t0 = time.time()
    # 1. rollout: k responses for each prompt of this rank's share; a group's k rows side by side
    rows = data_rng.choice(len(train_prompts), n_groups, replace=False)[rt.rank::rt.world_size]
    prompts = group_prompts([train_prompts[i] for i in rows], k)
    prompt, prompt_mask = left_pad(encode_prompts(enc, prompts, cfg.max_prompt_tokens), enc.eot_token, rt.device)
    with stop_if_diverged(run, iteration + 1):
        batch = rollout(policy, prompt, prompt_mask, cfg.max_new_tokens, cfg.temperature, enc.eot_token, rt,
                        generator)
    t1 = time.time()
    # 2. score: the normalised RM reward (or an ensemble's conservative aggregate), a penalty where the
    #    response never ended (as PPO)
    scores, ended, raw = score_responses(rm, gain, bias, batch, enc.eot_token, cfg.no_eos_penalty, rt, raw=True)
    scores, all_scores = ensemble_reward(members, batch, scores, ended, cfg, rt, raw)  # and each member's (K, B)
    # 3. old and reference logprobs, in the order of the first epoch's minibatches (no value model)
    first_order = torch.randperm(per_rank, generator=generator, device=rt.device)
    batch["old_logprobs"], batch["ref_logprobs"], _ = old_and_reference_logprobs(
        policy_train, reference, None, batch, first_order, minibatch_size, cfg.temperature, rt)
    # 4. advantages: one per response, the reward minus a baseline (running mean | leave-one-out | group mean)
    batch["advantages"], _ = pg_advantages(cfg.algo, scores, batch["old_logprobs"], batch["ref_logprobs"],
                                            batch["mask"], k, cfg.kl_coef, estimator, running_baseline)
    t2 = time.time()
    stopper.before_update()  # the weights that sampled this batch, kept if no monitor is past its threshold
    # 5. update: epochs of shuffled minibatches of the clipped loss (+ the KL term for grpo and drgrpo)
    stats = pg_update(policy_train, policy_opt, batch, first_order, minibatch_size, cfg, rt, generator, guard,
                      iteration + 1)
    t3 = time.time()

    texts = [enc.decode(r[:int(m.sum())].tolist()).replace("<|endoftext|>", "")
             for r, m in zip(batch["response"].cpu(), batch["mask"].cpu())]
    metrics, gold = iteration_metrics(batch, scores, ended, prompts, texts, rollout_kl(batch, rt), cfg.kl_coef,
                                      stats, rt)
    metrics.update(adv_std=float(batch["advantages"].std()), t_rollout=t1 - t0, t_score=t2 - t1, t_learn=t3 - t2)
    values, warned = watch(monitors, iteration + 1, all_scores, scores, batch, texts, rt)  # no gold read
    metrics.update(values)
    stop = stopper.after_observe(iteration, monitors, warned)  # --stop_on_monitor: stop at a warning
    if rt.is_main and ((iteration + 1) % cfg.sample_every == 0 or iteration == start):
        print_samples([{"prompt": p, "response": t, "reward": float(s), "gold": float(g)}
                       for p, t, s, g in list(zip(prompts, texts, scores.tolist(), gold))[:3]])
    last = iteration + 1 == cfg.iterations
    end_step(run, iteration + 1, metrics, save, log_due=(iteration + 1) % cfg.log_every == 0 or last,
             save_due=(iteration + 1) % cfg.save_every == 0 or last)
    if stop:  # put back the last policy no monitor was past its threshold on: save it, evaluate it
        save_step(run, save, stopper.restore())
        if rt.is_main:
            print(stopper.line(iteration + 1, warned, cfg.out_dir), flush=True)
        break
end_loop(run)

# ---------------------------------------------------------------- final evaluation on held-out prompts
if rt.is_main:
    policy.eval()
    name = {"reinforce": "REINFORCE", "rloo": "RLOO", "grpo": "GRPO", "drgrpo": "DrGRPO"}[cfg.algo]
    results = compare_to_reference(name, policy, reference, rm, gain, bias, enc, eval_prompts, cfg, rt)
    run.log.log(cfg.iterations if stopper.stopped is None else stopper.stopped, **results)
    plot_metrics(run.log.path, [["reward", "gold"], ["kl"], ["resp_len"]], os.path.join(cfg.out_dir, "pg.png"),
                 f"{name}: proxy reward vs gold score, KL to the reference, length")
    print(f"saved {cfg.out_dir}/ckpt.pt, metrics.jsonl, pg.png")
finish_ddp()
