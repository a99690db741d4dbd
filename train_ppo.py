"""Stage 3 of RLHF: PPO against the learned reward, with a KL leash to the SFT policy.

python train_ppo.py                 # the whole pipeline: trains out/sft and out/rm first if missing
python train_ppo.py --preset tiny   # seconds, for tests
python train_ppo.py --resume        # continue out/ppo/ckpt.pt
python train_ppo.py --init_policy out/ppo --rm_dir out/rm2 --out_dir out/ppo2   # iterated RLHF: a new round
python train_ppo.py --ptx_coef 1.0  # PPO-ptx (InstructGPT): plus gamma x the LM loss on training stories

Each iteration: prompts -> rollout -> RM score -> old and reference logprobs, values -> KL-shaped rewards,
GAE, whitened advantages -> PPO epochs -> adaptive KL update. The phases are in nanorlhf/ppo_step.py, the
math in nanorlhf/ppo.py (Ziegler et al. 2019, Ouyang et al. 2022, and the details of Huang et al. 2023).
"""
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, load_checkpoint, load_model, load_resume, rng_state, save_checkpoint
from nanorlhf.config import PPOConfig, parse_config, print_config
from nanorlhf.data import encode_prompts, left_pad, load_prompts
from nanorlhf.distributed import finish_ddp
from nanorlhf.evaluate import compare_to_reference
from nanorlhf.metrics import plot_metrics, print_samples
from nanorlhf.monitors import StopOnMonitor, ensemble_reward, rl_monitors, require_ensemble, watch
from nanorlhf.optim import make_optimizer, set_lr
from nanorlhf.ppo import AdaptiveKLController, FixedKLController
from nanorlhf.ppo_step import advantages, batch_sizes, iteration_metrics, rollout_kl, old_and_reference_logprobs, \
    ppo_update, ptx_loss_of, rollout, score_responses, value_model_from
from nanorlhf.runtime import end_loop, end_step, for_training, make_guard, restore, save_step, setup_runtime, \
    start_loop, stop_if_diverged, train_missing_stages
from nanorlhf.sampler import make_decode_step

cfg = parse_config(PPOConfig, "ppo", description=__doc__)
rt = setup_runtime(cfg, writes=True)  # out_dir/.lock: one run per folder
if rt.is_main:
    print_config(cfg)
require_ensemble(cfg)  # --reward_ensemble: refused here, not after training a missing RM that is not an ensemble
train_missing_stages(cfg, rt, ("sft", "rm"))

# ---------------------------------------------------------------- models: policy, reference, reward, value
try:
    policy, enc, sft_ckpt = load_model(cfg.sft_dir, "sft", rt.device, fits=cfg)
    if cfg.init_policy:  # iterated RLHF: continue from an earlier PPO policy; the reference stays SFT
        policy = load_model(cfg.init_policy, "ppo", rt.device, tokenizer_of=sft_ckpt, flag="--init_policy")[0]
    reference, _, _ = load_model(cfg.sft_dir, "sft", rt.device)
    rm, _, rm_ckpt = load_model(cfg.rm_dir, "rm", rt.device, tokenizer_of=sft_ckpt)
    ckpt = load_resume(cfg, "ppo", policy.config)  # None without --resume
    members, monitors = rl_monitors(cfg, rm, rm_ckpt, sft_ckpt, rt.device, ckpt)  # RM members, gold-free monitors
except CheckpointError as e:
    raise SystemExit(str(e))
gain, bias = rm_ckpt["gain"], rm_ckpt["bias"]  # the RM's score on SFT samples is normalised to mean 0, std 1
value_model = value_model_from(rm, rt.device)
for frozen in (reference, rm):
    frozen.eval().requires_grad_(False)  # never stepped (docs/design.md, detail 9)
policy.train(), value_model.train()  # dropout is 0 in every loaded model, so train() only enables grads
policy_opt = make_optimizer(policy, cfg.lr, 0.0, rt.device)
value_opt = make_optimizer(value_model, cfg.value_lr, 0.0, rt.device)
kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
          else FixedKLController(cfg.init_kl_coef))
generator = torch.Generator(rt.device).manual_seed(cfg.seed + rt.rank)  # rollouts draw from this alone
data_rng = np.random.default_rng(cfg.seed)  # prompt order, the same on every rank
guard = make_guard(cfg, rt, {"lr": cfg.lr, "value_lr": cfg.value_lr})
start = 0
if ckpt is not None:  # both models and optimizers, beta, the prompt order, the rollout generator, the RNGs
    start = restore(ckpt, rt, guard, {"model": policy, "value_model": value_model, "optimizer": policy_opt,
                                      "value_optimizer": value_opt}, generator, unit="iteration")
    kl_ctl.value = float(ckpt["kl_ctl"]["value"])  # beta as it was; its target and horizon as asked for now
    data_rng.bit_generator.state = ckpt["data_rng"]
    if rt.rank > 0:  # the checkpoint holds rank 0's generator: the other ranks draw their own rollouts
        generator.manual_seed(cfg.seed + rt.rank + 1000 * start)
    set_lr(policy_opt, cfg.lr), set_lr(value_opt, cfg.value_lr)  # the rates asked for now, not the saved ones
policy.grad_checkpoint = value_model.gpt.grad_checkpoint = cfg.grad_checkpoint
# the modules that train and give the old logprobs and values (--compile, DDP); rollouts use the plain policy
policy_train, value_train = for_training(policy, cfg, rt), for_training(value_model, cfg, rt)
# --compile: the rollout's decode step too (a CUDA graph on GPU). Its shapes must not change, so the prompts
# are padded to max_prompt_tokens; the step reads the policy's weights in place, so it sees every update.
decode_step = make_decode_step(policy, "cuda_graph" if rt.device.type == "cuda" else "compile") if cfg.compile else None
try:
    train_prompts, eval_prompts = load_prompts(cfg.dataset, cfg.eval_prompts)
except (OSError, ValueError, RuntimeError) as e:  # missing, empty or undownloadable corpus
    raise SystemExit(str(e))
per_rank, minibatch_size = batch_sizes(cfg.rollout_batch, cfg.n_minibatches, rt.world_size, len(train_prompts))
ptx_loss = ptx_loss_of(enc, cfg, rt, data_rng)  # PPO-ptx: the LM loss on training stories; None at --ptx_coef 0


def save(iteration):
    save_checkpoint(cfg.out_dir, {
        "stage": "ppo", "model": policy.state_dict(), "model_config": sft_ckpt["model_config"],
        "value_model": value_model.state_dict(), "config": asdict(cfg), "tokenizer": sft_ckpt["tokenizer"],
        "step": iteration, "optimizer": policy_opt.state_dict(), "value_optimizer": value_opt.state_dict(),
        "kl_ctl": kl_ctl.state_dict(), "rng": rng_state(generator), "data_rng": data_rng.bit_generator.state,
        "scaler": rt.scaler.state_dict() if rt.scaler else {}, "monitors": monitors.state_dict()})


# ---------------------------------------------------------------- the PPO loop
run = start_loop(cfg, rt, guard, start, resumed=ckpt is not None)  # metrics log, Ctrl-C: finish, save, exit
stopper = StopOnMonitor(cfg.stop_on_monitor, start, policy, value_model)  # keeps the last clear policy
for iteration in range(start, cfg.iterations):
    t0 = time.time()
    # 1. rollout: a response for each prompt of this rank's slice of the batch
    rows = data_rng.choice(len(train_prompts), cfg.rollout_batch, replace=False)[rt.rank::rt.world_size]
    prompts = [train_prompts[i] for i in rows]
    prompt, prompt_mask = left_pad(encode_prompts(enc, prompts, cfg.max_prompt_tokens), enc.eot_token, rt.device,
                                   width=cfg.max_prompt_tokens if decode_step else None)
    with stop_if_diverged(run, iteration + 1):  # a diverged policy stops the run with the guard's message
        batch = rollout(policy, prompt, prompt_mask, cfg.max_new_tokens, cfg.temperature, enc.eot_token, rt,
                        generator, decode_step)
    t1 = time.time()
    # 2. score: the normalised RM reward at the last real token (or an ensemble's conservative aggregate),
    #    a penalty where the response never ended
    scores, ended, raw = score_responses(rm, gain, bias, batch, enc.eot_token, cfg.no_eos_penalty, rt, raw=True)
    scores, all_scores = ensemble_reward(members, batch, scores, ended, cfg, rt, raw)  # and each member's (K, B)
    # 3. old and reference logprobs and old values, in the order of the first PPO epoch's minibatches
    first_order = torch.randperm(per_rank, generator=generator, device=rt.device)
    batch["old_logprobs"], batch["ref_logprobs"], batch["old_values"] = old_and_reference_logprobs(
        policy_train, reference, value_train, batch, first_order, minibatch_size, cfg.temperature, rt)
    # 4. advantages: KL-shaped rewards, GAE, whitening
    batch["advantages"], batch["returns"] = advantages(scores, batch["old_logprobs"], batch["ref_logprobs"],
                                                       batch["old_values"], batch["mask"], kl_ctl.value, cfg.gamma,
                                                       cfg.lam, rt)
    t2 = time.time()
    stopper.before_update()  # the weights that sampled this batch, kept if no monitor is past its threshold
    # 5. update: ppo_epochs passes of shuffled minibatches, clipped policy and value losses (+ the ptx term)
    stats = ppo_update(policy_train, value_train, policy_opt, value_opt, batch, first_order, minibatch_size, cfg,
                       rt, generator, guard, iteration + 1, ptx_loss)
    t3 = time.time()
    # 6. adaptive KL: move beta so that KL(pi || pi_ref) per response approaches target_kl
    kl, kl_coef = rollout_kl(batch, rt), kl_ctl.value
    kl_ctl.update(float(kl), cfg.rollout_batch)

    texts = [enc.decode(r[:int(m.sum())].tolist()).replace("<|endoftext|>", "")
             for r, m in zip(batch["response"].cpu(), batch["mask"].cpu())]
    metrics, gold = iteration_metrics(batch, scores, ended, prompts, texts, kl, kl_coef, stats, rt)
    metrics.update(t_rollout=t1 - t0, t_score=t2 - t1, t_learn=t3 - t2)
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
    results = compare_to_reference("PPO", policy, reference, rm, gain, bias, enc, eval_prompts, cfg, rt)
    run.log.log(cfg.iterations if stopper.stopped is None else stopper.stopped, **results,
                # detail 9, checked on the real run: the reference is bit-identical to the SFT checkpoint
                # it was loaded from, and no model has an active dropout
                reference_unchanged=all(torch.equal(p, q) for p, q in zip(
                    reference.state_dict().values(), load_checkpoint(cfg.sft_dir, "sft")["model"].values())),
                dropout_off=all(m.p == 0 for net in (policy, value_model, reference, rm) for m in net.modules()
                                if isinstance(m, torch.nn.Dropout)))
    plot_metrics(run.log.path, [["reward", "gold"], ["kl"], ["kl_coef"]], os.path.join(cfg.out_dir, "ppo.png"),
                 "PPO: proxy reward vs gold score, and KL to the reference")
    print(f"saved {cfg.out_dir}/ckpt.pt, metrics.jsonl, ppo.png")
finish_ddp()
