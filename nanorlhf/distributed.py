"""Several processes (torchrun + DistributedDataParallel): wrapping a model, averaging a metric over ranks,
a mean over a batch split across ranks, each rank's share of a batch. On one process each is the identity."""
import math

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def finish_ddp():
    """The end of a run under torchrun, every way out (done, or stopped by Ctrl-C): tear the process
    group down. A process that exits with it still up can abort in gloo's threads ("terminate called
    without an active exception", pytorch#190489). No barrier first: rank 0 may still evaluate for
    minutes after the loop, longer than NCCL waits at a barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    x = x.detach().to(rt.device, torch.float32, copy=True)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(x)
    return x / rt.world_size


def all_reduce_max(x, rt):
    """Largest value of a scalar tensor over ranks (itself on one process)."""
    if rt.world_size == 1:
        return x
    x = x.detach().to(rt.device, torch.float32, copy=True)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


# A mean over a global batch split across ranks: rank r holds the sum S_r over its n_r tokens (or
# pairs). DDP averages the ranks' gradients, so each rank divides S_r by (n_1 + ... + n_W) / W:
#   mean_r [ S_r / (sum_r n_r / W) ] = sum_r S_r / sum_r n_r     the mean over the whole batch,
# where S_r / n_r on each rank would give the mean of the ranks' means instead.
def global_mean_denominator(count, rt):
    """(sum over ranks of count) / world_size; count a 0-dim tensor (tokens, or pair weights), the
    count itself on one process. all_reduce_mean of the rank losses divided by it is the global mean.
    A count of 0 (nothing to average) divides by a tiny number instead: a sum of 0 stays 0."""
    count = count.detach().float()
    if rt.world_size > 1:
        count = count.clone()
        torch.distributed.all_reduce(count)
    return count.clamp(min=1e-8) / rt.world_size


def epoch_batch(n_rows, batch_size, step, seed, rt):
    """This rank's row indices at a step: every epoch shuffles the rows (seed + epoch: the same order
    on every rank) and cuts them into batches of batch_size, and rank r takes rows r, r + W, ... of the
    step's batch. A last batch with fewer rows than ranks is topped up from the epoch's start."""
    epoch, i = divmod(step, math.ceil(n_rows / batch_size))
    order = np.random.default_rng(seed + epoch).permutation(n_rows)
    batch = order[i * batch_size:(i + 1) * batch_size]
    if len(batch) < rt.world_size:  # every rank needs a row: DDP steps only when all of them do
        batch = np.concatenate([batch, order[:rt.world_size - len(batch)]])
    return batch[rt.rank::rt.world_size]


def all_gather_lists(items, rt):
    """Every rank's python list, concatenated in rank order (the list itself on one process)."""
    if rt.world_size == 1:
        return items
    parts = [None] * rt.world_size
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]
