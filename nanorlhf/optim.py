"""The optimizer step every stage shares: AdamW parameter groups, a clipped (and on fp16, loss-scaled)
step that skips non-finite gradients, and the learning-rate schedules (warmup, cosine)."""
import math

import torch


def make_optimizer(model, lr, weight_decay, device, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only (not biases, LayerNorms). Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def backward(loss, rt):
    (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()


def optimizer_step(model, optimizer, rt, grad_clip, update_scaler=True):
    """Clip the gradient norm and step. A non-finite gradient skips the step (the
    gradients are dropped) and returns False with the norm, so callers can count it.
    Two optimizers on one loss (PPO's policy and value) step the first with update_scaler=False:
    fp16's GradScaler must unscale both with the scale the loss was multiplied by, then update once."""
    if rt.scaler is not None:
        rt.scaler.unscale_(optimizer)  # the fp32 master gradients, divided by the loss scale
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = bool(torch.isfinite(grad_norm))
    if rt.scaler is not None:
        rt.scaler.step(optimizer)  # the scaler skips non-finite steps itself and lowers its scale
        if update_scaler:
            rt.scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, float(grad_norm)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_lr(lr, step, total_steps):
    """Linear warmup over the first tenth of the run, then flat (the reward model and DPO)."""
    return lr * min(1.0, (step + 1) / max(1, total_steps // 10))


def cosine_lr(step, lr, min_lr, warmup_iters, max_iters):
    """Linear warmup over warmup_iters, then cosine decay from lr to min_lr at max_iters (SFT)."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    progress = min((step - warmup_iters) / max(max_iters - warmup_iters, 1), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
