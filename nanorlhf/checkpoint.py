"""Checkpoints: a plain dict in out/<stage>/ckpt.pt, written atomically, loaded safely.

{"stage", "model", "model_config", "config", "tokenizer", "step", ...} plus whatever the
stage needs to resume (optimizer, RNG states, KL controller, data position).
Loading uses torch.load(weights_only=True): a checkpoint can hold tensors and plain
python values, never code, so a file from a stranger cannot run anything.
"""
import os
import pickle
import random
import zipfile

import numpy as np
import torch

# the command that makes each stage's checkpoint, for error messages
MAKES = {"sft": "python train_sft.py", "rm": "python train_rm.py", "ppo": "python train_ppo.py",
         "dpo": "python train_dpo.py"}


class CheckpointError(RuntimeError):
    pass


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.pt")


def atomic_write(path, write_fn):
    """Write via write_fn(file) to a temporary file in the same directory, flush,
    fsync, then rename over path: a crash leaves either the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(out_dir, ckpt):
    atomic_write(ckpt_path(out_dir), lambda f: torch.save(ckpt, f))


def load_checkpoint(out_dir, stage=None):
    """Load out_dir/ckpt.pt; stage ("sft", "rm", ...) checks that it is the kind expected.
    Every failure says what to do."""
    path = ckpt_path(out_dir) if not out_dir.endswith(".pt") else out_dir
    make = MAKES.get(stage, "the training script")
    if not os.path.exists(path):
        raise CheckpointError(f"no {stage or ''} checkpoint at {path} — run `{make}` first "
                              f"(or point --{stage}_dir at one)".replace("  ", " "))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds something other than tensors and plain values, so it was "
                              f"refused unread (weights_only=True). Only load checkpoints nanorlhf wrote. "
                              f"Details: {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
                              f"delete it and re-run `{make}`") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "stage" not in ckpt:
        raise CheckpointError(f"{path} is not a nanorlhf checkpoint (no 'model'/'stage' keys)")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path} is a {ckpt['stage']!r} checkpoint but a {stage!r} one is needed here — "
                              f"run `{make}` or pass the right directory")
    return ckpt


def rng_state(generator=None):
    """Every random state a run consumes, as tensors and plain values (weights_only-safe)."""
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state, generator=None):
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def load_model(out_dir, stage, device, tokenizer_of=None):
    """Model, tokenizer and checkpoint dict of a stage's checkpoint. Policies (sft, ppo,
    dpo) are GPTs; reward models (rm) are ScalarGPTs. tokenizer_of: another checkpoint
    whose tokenizer this one must share."""
    from nanorlhf.model import GPT, GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import same_tokenizer, tokenizer_from_state
    ckpt = load_checkpoint(out_dir, stage)
    if tokenizer_of is not None and not same_tokenizer(ckpt["tokenizer"], tokenizer_of["tokenizer"]):
        raise CheckpointError(f"the {stage} checkpoint in {out_dir} uses another tokenizer than the "
                              f"{tokenizer_of['stage']} checkpoint it is used with: retrain it from that one")
    config = GPTConfig(**{**ckpt["model_config"], "dropout": 0.0})  # dropout off for RL (DESIGN detail 9)
    model = ScalarGPT(config) if stage == "rm" else GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{out_dir}/ckpt.pt does not match its stored model config ({str(e)[:200]})") from e
    enc = tokenizer_from_state(ckpt["tokenizer"])
    if enc.n_vocab != config.vocab_size:
        raise CheckpointError(f"{out_dir}/ckpt.pt: tokenizer has {enc.n_vocab} tokens but the model "
                              f"{config.vocab_size}: the checkpoint is inconsistent; retrain it")
    return model.to(device), enc, ckpt
