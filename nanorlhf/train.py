"""The training step every stage shares: AdamW parameter groups, a clipped (and on
fp16, loss-scaled) optimizer step that skips non-finite gradients, DDP wrapping and
metric averaging across ranks."""
import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def make_optimizer(model, lr, weight_decay, device, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only (not biases, LayerNorms). Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def backward(loss, rt):
    (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()


def optimizer_step(model, optimizer, rt, grad_clip):
    """Clip the gradient norm and step. A non-finite gradient skips the step (the
    gradients are dropped) and returns False with the norm, so callers can count it."""
    if rt.scaler is not None:
        rt.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = bool(torch.isfinite(grad_norm))
    if rt.scaler is not None:
        rt.scaler.step(optimizer)  # the scaler skips non-finite steps itself and lowers its scale
        rt.scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, float(grad_norm)


def wrap_ddp(model, rt):
    if rt.world_size == 1:
        return model
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


def all_reduce_mean(x, rt):
    """Mean of a scalar tensor over ranks (itself on one process)."""
    if rt.world_size == 1:
        return x
    x = x.detach().clone().float()
    torch.distributed.all_reduce(x)
    return x / rt.world_size
