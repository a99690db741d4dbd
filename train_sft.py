"""Stage 1 of RLHF: supervised fine-tuning (here: language modelling) on stories.

python train_sft.py                 # cpu preset without a GPU, gpu preset with one
python train_sft.py --preset tiny   # a few seconds, for tests
python train_sft.py --resume        # continue out/sft/ckpt.pt exactly

Reads top to bottom: config -> data and tokenizer -> model -> loop -> save.
"""
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from nanorlhf.checkpoint import CheckpointError, load_resume, rng_state, save_checkpoint
from nanorlhf.config import SFTConfig, parse_config, print_config
from nanorlhf.data import DATA_DIR, encode_prompts, encode_stories, left_pad, load_corpus, split_prompt, \
    story_batch, train_val_stories
from nanorlhf.distributed import all_reduce_mean, finish_ddp, global_mean_denominator, unwrap, wrap_ddp
from nanorlhf.flops import peak_flops, training_speed
from nanorlhf.metrics import plot_metrics, print_samples
from nanorlhf.model import GPT, GPTConfig, load_pretrained_gpt2
from nanorlhf.optim import backward, cosine_lr, make_optimizer, optimizer_step, set_lr
from nanorlhf.runtime import end_loop, end_step, guarded_sample, make_guard, restore, setup_runtime, start_loop
from nanorlhf.sampler import generate
from nanorlhf.tokenizer import get_tokenizer, tokenizer_from_state, tokenizer_state

cfg = parse_config(SFTConfig, "sft", description=__doc__)
rt = setup_runtime(cfg, writes=True)  # out_dir/.lock: one run per folder
if rt.is_main:
    print_config(cfg)
    print(f"device {rt.device} | precision {rt.dtype} | processes {rt.world_size}")

# ---------------------------------------------------------------- resume?
try:
    resume_ckpt = load_resume(cfg, "sft")  # None without --resume
except CheckpointError as e:
    raise SystemExit(str(e))

# ---------------------------------------------------------------- data and tokenizer
try:
    text = load_corpus(cfg.dataset)
    train_stories, val_stories = train_val_stories(text)
except (OSError, ValueError, RuntimeError) as e:  # missing, empty or undownloadable corpus
    raise SystemExit(str(e))
t0 = time.time()
if resume_ckpt is not None:
    enc = tokenizer_from_state(resume_ckpt["tokenizer"])  # the tokenizer the run started with
else:
    tok_text = text[:cfg.tokenizer_chars] if cfg.tokenizer_chars else text
    enc = get_tokenizer(cfg.tokenizer, tok_text, cfg.vocab_size,
                        os.path.join(DATA_DIR, "cache", f"tokenizer-{cfg.tokenizer}-{cfg.vocab_size}.json"))
train_seqs, train_prompt_lens = encode_stories(enc, train_stories)
val_seqs, val_prompt_lens = encode_stories(enc, val_stories)
n_train_tokens = sum(len(s) for s in train_seqs)
# unigram entropy H = -sum_v p(v) log p(v) of the training tokens: what a model that ignores context scores
counts = np.bincount(np.concatenate(train_seqs), minlength=enc.n_vocab).astype(np.float64)
p = counts[counts > 0] / counts.sum()
unigram_entropy = float(-(p * np.log(p)).sum())
if rt.is_main:
    print(f"{len(train_stories)} train / {len(val_stories)} validation stories, {n_train_tokens:,} train tokens, "
          f"vocab {enc.n_vocab} ({time.time() - t0:.1f} s) | unigram entropy {unigram_entropy:.3f} nats/token")

# ---------------------------------------------------------------- model
if cfg.init_from == "gpt2":
    if cfg.tokenizer != "gpt2":
        raise SystemExit("--init_from gpt2 needs --tokenizer gpt2 (GPT-2's own vocabulary)")
    model = load_pretrained_gpt2("gpt2")
    model_config = model.config
elif cfg.init_from == "scratch":
    model_config = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.sft_dropout)
    model = GPT(model_config)
else:
    raise SystemExit(f"unknown --init_from {cfg.init_from!r}: scratch | gpt2")
loss_on_response = cfg.loss_on == "response" or (cfg.loss_on == "auto" and cfg.init_from != "scratch")
model.grad_checkpoint = cfg.grad_checkpoint
model.to(rt.device)  # fp32 master weights; autocast computes the matrix products in bf16/fp16
optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt.device)
step = 0
data_rng = np.random.default_rng(cfg.seed)  # the same on every rank: each takes its slice of a global batch
val_loss = None
best_val_loss, best_step = float("inf"), 0  # the checkpoint keeps the best validation loss (see the loop)
guard = make_guard(cfg, rt, {"lr": cfg.lr})
if resume_ckpt is not None:  # everything the next step depends on: weights, Adam moments, data order, RNGs
    step = best_step = restore(resume_ckpt, rt, guard, {"model": model, "optimizer": optimizer})
    val_loss = resume_ckpt["val_loss"]
    best_val_loss = resume_ckpt.get("best_val_loss", val_loss if val_loss is not None else float("inf"))
    data_rng.bit_generator.state = resume_ckpt["data_rng"]
model = wrap_ddp(model, rt)
if rt.is_main:
    print(f"model: {unwrap(model).num_params() / 1e6:.2f}M parameters | loss on "
          f"{'response tokens' if loss_on_response else 'whole stories'}")


def token_nll(model, x, y):
    """-log p(y_t | x_<=t) for every position (B, T): the logits in bf16/fp16 under autocast, the
    cross-entropy in fp32. Right padding needs no attention mask under a causal mask."""
    with rt.autocast():
        logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


# --compile: the model and its cross-entropy in one graph, so the fp32 logits are never written out whole
# (2% more tokens/s than compiling the model alone on an H100, bench.py train --loss_in_compile)
nll_of = torch.compile(token_nll, mode=cfg.compile_mode) if cfg.compile else token_nll


def make_batch(seqs, prompt_lens, rows):
    """Inputs x, targets y and the mask of the targets that count (B, T), on the device."""
    x, y, loss_mask = story_batch(seqs, prompt_lens, rows, cfg.block_size, enc.eot_token, loss_on_response)
    return x.to(rt.device), y.to(rt.device), loss_mask.to(rt.device)


def batch_loss(batch, denominator):
    """The summed -log p of the targets that count, divided by denominator (global_mean_denominator of
    all the tokens the mean is over: this batch's, or a whole accumulated step's, on every rank)."""
    x, y, loss_mask = batch
    return (nll_of(model, x, y) * loss_mask).sum() / denominator


@torch.no_grad()
def validation_loss():
    model.eval()
    rng = np.random.default_rng(0)  # the same validation batches every time
    losses = []
    for _ in range(cfg.eval_iters):
        rows = rng.integers(0, len(val_seqs), cfg.batch_size)[rt.rank::rt.world_size]
        batch = make_batch(val_seqs, val_prompt_lens, rows)
        losses.append(batch_loss(batch, global_mean_denominator(batch[2].sum(), rt)))
    model.train()
    return float(all_reduce_mean(torch.stack(losses).mean(), rt))


def print_continuations(n=2):
    model.eval()
    prompts = [split_prompt(s)[0] for s in val_stories[:n]]
    tokens, mask = left_pad(encode_prompts(enc, prompts, cfg.max_prompt_tokens), enc.eot_token, rt.device)
    with rt.autocast():
        out = generate(unwrap(model), tokens, mask, cfg.max_new_tokens, temperature=cfg.temperature,
                       eos_id=enc.eot_token, generator=torch.Generator(rt.device).manual_seed(cfg.seed))
    model.train()
    print_samples([{"prompt": p, "response": enc.decode(t[m.bool()].tolist())}
                   for p, t, m in zip(prompts, out["tokens"].cpu(), out["mask"].cpu())])


def save(step):
    state = unwrap(model).state_dict()
    save_checkpoint(cfg.out_dir, {
        "stage": "sft", "model": state, "model_config": {**asdict(unwrap(model).config), "dropout": 0.0},
        "config": asdict(cfg), "tokenizer": tokenizer_state(enc), "step": step,
        "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict() if rt.scaler else {},
        "rng": rng_state(), "data_rng": data_rng.bit_generator.state,
        "val_loss": val_loss, "best_val_loss": best_val_loss, "unigram_entropy": unigram_entropy})


# ---------------------------------------------------------------- training loop
model.train()
run = start_loop(cfg, rt, guard, step, resumed=resume_ckpt is not None)  # metrics log, Ctrl-C: finish, save, exit
t_last = time.time()
peak = peak_flops(rt.device, rt.dtype)  # None on CPUs and unknown GPUs: no MFU then
while step < cfg.max_iters:
    lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
    set_lr(optimizer, lr)
    total, t_step = 0.0, time.time()
    batches = [make_batch(train_seqs, train_prompt_lens,
                          data_rng.integers(0, len(train_seqs), cfg.batch_size)[rt.rank::rt.world_size])
               for _ in range(cfg.grad_accum)]
    # the mean over every token that counts in the step (all micro-batches, all ranks): what one batch of
    # batch_size x grad_accum stories would give, not a mean of the micro-batches' means
    denominator = global_mean_denominator(sum(batch[2].sum() for batch in batches), rt)
    for micro, batch in enumerate(batches):
        if rt.world_size > 1:  # DDP averages the gradients over ranks once, after the last micro-batch
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        loss = batch_loss(batch, denominator)
        backward(loss, rt)
        total += loss.detach()
    finite, grad_norm = optimizer_step(model, optimizer, rt, cfg.grad_clip)  # float(grad_norm) waits for the GPU
    step += 1
    # the speed of the training step alone (not evaluation or sampling): tokens/s over all ranks, and the
    # MFU of this rank's GPU where its peak FLOP/s is known (flops.PEAK_FLOPS: H100, H200, A100)
    tok_per_s, mfu = training_speed(unwrap(model), [batch[0].shape for batch in batches], time.time() - t_step, peak)
    metrics = {"loss": float(all_reduce_mean(total, rt)), "lr": lr, "grad_norm": grad_norm,
               "tok_per_s": float(all_reduce_mean(torch.tensor(tok_per_s), rt)) * rt.world_size,  # all ranks'
               **({"mfu": mfu} if mfu is not None else {})}
    guard.check(step, metrics["loss"], finite, rt.scaler)  # a bad step was skipped; stops after max_bad_steps
    evaluated = step % cfg.eval_every == 0 or step == cfg.max_iters
    if evaluated:
        val_loss = validation_loss()
        metrics.update(val_loss=val_loss, unigram_entropy=unigram_entropy)
    elif run.stop.requested(rt):  # Ctrl-C: a stop saves only a better fit, so measure it
        val_loss, evaluated = validation_loss(), True
    metrics["time_s"] = time.time() - t_last
    t_last = time.time()
    # a good checkpoint is never replaced by a bad one, nor by a worse fit: once the validation loss rises
    # (the model memorises the training stories) the checkpoint stays at the best step
    better = evaluated and guard.can_save(val_loss) and val_loss < best_val_loss
    if better:
        best_val_loss, best_step = val_loss, step
    end_step(run, step, metrics, save, log_due=step % cfg.log_every == 0 or "val_loss" in metrics,
             save_due=better, stop_save=better)
    if rt.is_main and (step % cfg.sample_every == 0 or step == cfg.max_iters):
        guarded_sample(run, step, print_continuations)  # not while the steps are bad
end_loop(run)

if rt.is_main:
    plot_metrics(run.log.path, [["loss", "val_loss", "unigram_entropy"]], os.path.join(cfg.out_dir, "loss.png"),
                 "SFT loss (nats/token)")
    if best_step < step:
        print(f"validation loss rose after step {best_step} (to {val_loss:.3f} at step {step}): the checkpoint "
              f"keeps step {best_step}")
    gap = unigram_entropy - best_val_loss  # below the entropy: the model uses the context
    print(f"done: validation loss {best_val_loss:.3f} nats/token vs unigram entropy {unigram_entropy:.3f} "
          f"({abs(gap):.2f} {'below' if gap >= 0 else 'above: not yet better than ignoring the context'}) | "
          f"saved {cfg.out_dir}/ckpt.pt and loss.png")
finish_ddp()
