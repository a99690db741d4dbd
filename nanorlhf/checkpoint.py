"""Checkpoints: a plain dict in out/<stage>/ckpt.pt, written atomically, loaded safely.

{"stage", "model", "model_config", "config", "tokenizer", "step", ...} plus whatever the
stage needs to resume (optimizer, RNG states, KL controller, data position).
Writing is atomic (a temporary file, fsync, rename): a run killed at any moment leaves the
previous checkpoint whole. Loading checks the zip archive and its CRC-32s first, then uses
torch.load(weights_only=True): a checkpoint can hold tensors and plain python values, never
code, so a file from a stranger cannot run anything.
"""
import io
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from nanorlhf.io import atomic_write
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.tokenizer import same_tokenizer, tokenizer_from_state

# the keys every checkpoint holds (save_checkpoint's callers write them all); a file without one is refused
REQUIRED = {"stage", "model", "model_config", "config", "tokenizer", "step"}
# the command that makes each stage's checkpoint, for error messages
MAKES = {"sft": "python train_sft.py", "rm": "python train_rm.py", "ppo": "python train_ppo.py",
         "dpo": "python train_dpo.py", "pg": "python train_pg.py"}


class CheckpointError(RuntimeError):
    pass


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.pt")


class NonFiniteWeightsError(ValueError):
    pass


def save_checkpoint(out_dir, ckpt):
    """Write ckpt atomically. Weights that hold nan or inf are refused (NonFiniteWeightsError): such a model
    is broken, and must not replace a good one. The archive is built in memory first, so that a failed write
    (a full disk) raises a plain OSError and leaves the old file whole."""
    for key in ("model", "value_model"):
        part = ckpt.get(key)
        weights = [t for t in part.values() if torch.is_tensor(t) and t.is_floating_point()] \
            if isinstance(part, dict) else []
        if weights and not all(bool(torch.isfinite(t).all()) for t in weights):
            raise NonFiniteWeightsError(f"the {key}'s weights hold nan or inf")
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write(ckpt_path(out_dir), lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(out_dir, stage=None, flag=None):
    """Load out_dir/ckpt.pt; stage ("sft", "rm", ...) checks that it is the kind expected.
    flag: the command-line flag that named out_dir (default --<stage>_dir). Every failure says what to do."""
    out_dir = os.fspath(out_dir)
    path = ckpt_path(out_dir) if not out_dir.endswith(".pt") else out_dir
    make = MAKES.get(stage, "the training script")
    flag = flag or (f"--{stage}_dir" if stage else "--ckpt")
    if not os.path.exists(path):
        raise CheckpointError(f"no {stage or ''} checkpoint at {path} — run `{make}` first "
                              f"(or point {flag} at one)".replace("  ", " "))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file: point {flag} at the folder that holds ckpt.pt")
    # torch.save writes a zip archive whose directory comes last: a file cut short (a crash
    # mid-copy, a full disk) or of another format is refused here, before anything is unpickled
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint nanorlhf wrote ({os.path.getsize(path)} bytes, not a "
                              f"torch zip archive: truncated, corrupt or another format), so it was not read; "
                              f"delete it and re-run `{make}`")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()  # the CRC-32 of every member: torch.load would not notice flipped bits
    except Exception as e:  # noqa: BLE001 - a damaged archive raises many kinds of error
        bad_member = f"its archive ({type(e).__name__}: {e})"
    if bad_member:
        raise CheckpointError(f"{path} is corrupt: {bad_member} fails its CRC-32 check (a disk or copy error); "
                              f"delete it and re-run `{make}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; we keep only the line naming what was refused
        what = next((line.split("WeightsUnpickler error:")[-1].split(" was not")[0].strip()
                     for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
        raise CheckpointError(f"{path} holds something other than tensors and plain values (code or objects), "
                              f"so it was refused unread (weights_only=True): {what or 'refused'}. Only load "
                              f"checkpoints nanorlhf wrote, and never with weights_only=False") from e
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, KeyError, ...: all mean a damaged file
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
                              f"delete it and re-run `{make}`") from e
    missing = REQUIRED - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise CheckpointError(f"{path} is not a nanorlhf checkpoint (no {sorted(missing)} keys): only load "
                              f"checkpoints nanorlhf wrote; re-run `{make}`")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_config"], dict):
        raise CheckpointError(f"{path} is not a nanorlhf checkpoint ('model' and 'model_config' must be dicts): "
                              f"re-run `{make}`")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path} is a {ckpt['stage']!r} checkpoint but a {stage!r} one is needed here — "
                              f"run `{make}` or pass the right directory")
    return ckpt


SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")  # what a model's weights must agree on


def load_resume(cfg, stage, model_config=None):
    """The checkpoint that --resume continues (None without --resume). A missing or broken one
    raises CheckpointError; settings that differ from the checkpoint's are listed, because a
    resumed run equals a run that never stopped only with the same ones. A model of another shape
    is refused here, not deep in load_state_dict: model_config is the GPTConfig this run builds
    (from --sft_dir); SFT from scratch builds its model from the shape flags."""
    if not cfg.resume:
        return None
    if not os.path.exists(ckpt_path(cfg.out_dir)):
        raise CheckpointError(f"--resume: nothing to resume at {ckpt_path(cfg.out_dir)}; pass the --out_dir of "
                              f"the run to continue, or drop --resume to start a new one")
    ckpt = load_checkpoint(cfg.out_dir, stage)
    saved = ckpt.get("config", {})
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in vars(cfg).items()
               if k not in ("resume", "out_dir") and k in saved and saved[k] != v]
    if changed:
        print(f"resuming with changed settings: {', '.join(changed)}")
    then = {k: ckpt["model_config"][k] for k in SHAPE}
    if model_config is not None:
        now = {k: getattr(model_config, k) for k in SHAPE}
        fix = f"pass the --sft_dir it was trained from ({saved.get('sft_dir', '?')})"
    elif stage == "sft" and getattr(cfg, "init_from", "") == "scratch":
        now = {**then, **{k: getattr(cfg, k) for k in SHAPE[1:]}}  # the vocabulary comes from the checkpoint
        fix = "resume with the model flags it was saved with"
    else:
        return ckpt
    if now != then:
        differ = ", ".join(f"{k} {then[k]} -> {now[k]}" for k in SHAPE if then[k] != now[k])
        raise CheckpointError(f"--resume: {ckpt_path(cfg.out_dir)} holds a model of another shape than this run "
                              f"builds ({differ}): {fix}, or drop --resume to start a new run")
    return ckpt


def rng_state(generator=None):
    """Every random state a run consumes, as tensors and plain values (weights_only-safe)."""
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": keys.tolist(), "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached_gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state, generator=None):
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    has_gauss, cached_gauss = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], has_gauss,
                         cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def load_model(out_dir, stage, device, tokenizer_of=None, flag=None, fits=None):
    """Model, tokenizer and checkpoint dict of a stage's checkpoint. Policies (sft, ppo,
    dpo) are GPTs; reward models (rm) are ScalarGPTs. tokenizer_of: another checkpoint
    whose tokenizer this one must share. flag: as load_checkpoint. fits: a config whose
    max_prompt_tokens + max_new_tokens the model's block_size must hold."""
    ckpt = load_checkpoint(out_dir, stage, flag)
    block_size = ckpt["model_config"]["block_size"]
    if fits is not None and fits.max_prompt_tokens + fits.max_new_tokens > block_size:
        raise CheckpointError(f"max_prompt_tokens + max_new_tokens ({fits.max_prompt_tokens} + {fits.max_new_tokens}) "
                              f"exceed the block_size {block_size} of the model in {out_dir}: pass the --preset it "
                              f"was trained with ({ckpt.get('config', {}).get('preset', '?')}), or shorter lengths")
    if tokenizer_of is not None and not same_tokenizer(ckpt["tokenizer"], tokenizer_of["tokenizer"]):
        raise CheckpointError(f"the {stage} checkpoint in {out_dir} uses another tokenizer than the "
                              f"{tokenizer_of['stage']} checkpoint it is used with: retrain it from that one")
    if stage == "rm" and "gain" not in ckpt:  # a mid-training checkpoint: no reward normalisation yet
        raise CheckpointError(f"the reward model in {out_dir} stopped at step {ckpt['step']}, before it finished: "
                              f"rerun the command that made it with --resume "
                              f"(`{MAKES['rm']} --resume --out_dir {out_dir}`)")
    try:
        config = GPTConfig(**{**ckpt["model_config"], "dropout": 0.0})  # dropout off for RL (docs/design.md detail 9)
    except TypeError as e:
        raise CheckpointError(f"{ckpt_path(out_dir)}: its model_config is not a GPTConfig ({e}): re-run "
                              f"`{MAKES.get(stage)}`") from None
    model = ScalarGPT(config) if stage == "rm" else GPT(config)
    wanted, stored = set(model.state_dict()), set(ckpt["model"])
    if wanted != stored:
        differ = "; ".join(f"{what} {sorted(keys)[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", wanted - stored), ("unexpected", stored - wanted)) if keys)
        raise CheckpointError(f"{ckpt_path(out_dir)}: its weights do not match its model config ({differ}): the "
                              f"file was edited or is damaged; re-run `{MAKES.get(stage)}`")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # a tensor of another shape
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{ckpt_path(out_dir)} does not match its stored model config ({reason}): re-run "
                              f"`{MAKES.get(stage)}`") from None
    enc = tokenizer_from_state(ckpt["tokenizer"])
    if enc.n_vocab != config.vocab_size:
        raise CheckpointError(f"{out_dir}/ckpt.pt: tokenizer has {enc.n_vocab} tokens but the model "
                              f"{config.vocab_size}: the checkpoint is inconsistent; retrain it")
    return model.to(device), enc, ckpt


def load_policy(out_dir, device, tokenizer_of=None, flag="--ckpt"):
    """A policy checkpoint of any stage (sft, ppo, dpo), the stage read from the file; a reward model is
    refused. Returns model, tokenizer, checkpoint dict, as load_model."""
    if not os.path.exists(ckpt_path(out_dir)):
        raise CheckpointError(f"no checkpoint at {ckpt_path(out_dir)}: pass a dir that train_sft.py, train_ppo.py "
                              f"or train_dpo.py wrote")
    stage = load_checkpoint(out_dir)["stage"]
    if stage == "rm":
        raise CheckpointError(f"{out_dir} holds a reward model, not a policy: pass an sft, ppo or dpo dir in {flag}")
    return load_model(out_dir, stage, device, tokenizer_of)
