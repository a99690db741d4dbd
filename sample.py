"""Continue prompts with a trained policy and score each continuation with the reward model and the gold judge.

python sample.py "Once upon a time, a girl"                 # the newest of out/ppo, out/dpo, out/sft
python sample.py --ckpt out/ppo --compare out/sft "Tom was sad."   # the SFT continuation beside it
python sample.py --prompts prompts.txt --n 4 --top_p 0.9    # one prompt per line, 4 samples each

reward: the reward model's score (out/rm), normalised to mean 0, std 1 on SFT samples (as in PPO, where a
        response that never ended gets a penalty instead: see the "ended" column).
gold:   the gold judge (nanorlhf/judge.py) that stands in for what people really want; no model sees it.
"""
import argparse
import itertools
import math
import os
import textwrap

import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_model, load_policy
from nanorlhf.judge import gold_score
from nanorlhf.metrics import print_samples
from nanorlhf.reward import normalised_scores
from nanorlhf.runtime import setup_runtime
from nanorlhf.sampler import NonFiniteLogitsError, sample_responses

POLICY_DIRS = ("out/ppo", "out/dpo", "out/sft")  # where --ckpt looks when not given
WIDTH = 100  # console width of the printed samples

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="*", help="prompts to continue")
parser.add_argument("--prompts", default="", help="a text file of prompts, one per line")
parser.add_argument("--ckpt", default="", help=f"policy checkpoint dir; default: the newest of {POLICY_DIRS}")
parser.add_argument("--compare", default="", help="a second policy checkpoint dir, sampled beside the first")
parser.add_argument("--rm_dir", default="out/rm", help="reward model dir (no reward column without one)")
parser.add_argument("--n", type=int, default=1, help="samples per prompt")
parser.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's training temperature")
parser.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens only")
parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set with mass p")
parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the checkpoint's max_new_tokens")
parser.add_argument("--seed", type=int, default=1337, help="both policies get the same random draws")
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
args = parser.parse_args()
for flag, ok, need in (("n", args.n >= 1, ">= 1"),
                       ("temperature", args.temperature is None or 0 < args.temperature < math.inf,
                        "> 0 and finite (for greedy decoding use --top_k 1)"),
                       ("top_k", args.top_k is None or args.top_k >= 1, ">= 1"),
                       ("top_p", args.top_p is None or 0 <= args.top_p <= 1, "between 0 (greedy) and 1"),
                       ("max_new_tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1")):
    if not ok:
        parser.error(f"--{flag} must be {need}")
rt = setup_runtime(args)  # reads device, dtype, seed

# ---------------------------------------------------------------- prompts
prompts = list(args.prompt)
if args.prompts:
    try:
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise SystemExit(f"cannot read --prompts {args.prompts}: {e.strerror}")
if not prompts:
    parser.error('give a prompt ("Once upon a time, a girl") or --prompts FILE')
prompts = [p for p in prompts for _ in range(args.n)]

# ---------------------------------------------------------------- models
if not args.ckpt:
    found = [d for d in POLICY_DIRS if os.path.exists(ckpt_path(d))]
    if not found:
        raise SystemExit(f"no checkpoint in {', '.join(POLICY_DIRS)} — run `python train_sft.py` first, "
                         f"or pass --ckpt DIR")
    args.ckpt = max(found, key=lambda d: os.path.getmtime(ckpt_path(d)))
    print(f"--ckpt {args.ckpt} (the most recently written of {', '.join(found)})")


try:
    policy, enc, ckpt = load_policy(args.ckpt, rt.device)
    compare = load_policy(args.compare, rt.device, tokenizer_of=ckpt, flag="--compare")[0] if args.compare else None
except CheckpointError as e:
    raise SystemExit(str(e))
rm, rm_note = None, ""
if os.path.exists(ckpt_path(args.rm_dir)):
    try:
        rm, _, rm_ckpt = load_model(args.rm_dir, "rm", rt.device, tokenizer_of=ckpt)
    except CheckpointError as e:
        raise SystemExit(str(e))
    rm.eval()
else:
    rm_note = f"(no reward column: no reward model at {ckpt_path(args.rm_dir)} — run `python train_rm.py`)"

trained = ckpt["config"]
temperature = args.temperature if args.temperature is not None else trained["temperature"]
max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else trained["max_new_tokens"]
# every model here reads prompt + response: the shortest block_size of them decides what fits
block_size, shortest = min((m.config.block_size, name) for name, m in
                           ((args.ckpt, policy), (args.compare, compare), (args.rm_dir, rm and rm.gpt)) if m is not None)
max_prompt_tokens = min(trained["max_prompt_tokens"], block_size - max_new_tokens)
if max_prompt_tokens < 1:
    raise SystemExit(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the block_size "
                     f"{block_size} of the model in {shortest}: ask for fewer tokens")


def continuations(model, name):
    """Sample one continuation per prompt -> rows of response, reward (if an RM), gold."""
    generator = torch.Generator(rt.device).manual_seed(args.seed)  # the same draws for every model
    try:
        out = sample_responses(model, enc, prompts, max_prompt_tokens, max_new_tokens, rt, temperature,
                               generator=generator, top_k=args.top_k, top_p=args.top_p)
    except NonFiniteLogitsError as e:  # a checkpoint with diverged weights
        raise SystemExit(f"{name}: {e}")
    rows = [{"response": text} for text in out["texts"]]
    if rm is not None:  # normalised as in training: gain * raw + bias
        for row, r in zip(rows, normalised_scores(rm, rm_ckpt["gain"], rm_ckpt["bias"], out["batches"], rt).tolist()):
            row["reward"] = r
    for row, prompt, text, ended in zip(rows, prompts, out["texts"], out["ended"]):
        row["gold"] = gold_score(prompt, text, ended)
        row["ended"] = "yes" if ended else "no"
    return rows


def scores(row):
    return "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "response")


def print_side_by_side(prompt, left, right, left_name, right_name):
    """The prompt, then two continuations in columns with their scores below them."""
    col = (WIDTH - 3) // 2
    print(textwrap.fill("PROMPT: " + prompt, WIDTH))
    lines = lambda name, row: [name, *textwrap.wrap(row["response"], col), scores(row)]
    for a, b in itertools.zip_longest(lines(left_name, left), lines(right_name, right), fillvalue=""):
        print(f"{a:<{col}} | {b}")
    print("-" * WIDTH)


# ---------------------------------------------------------------- sample and print
print(f"{args.ckpt} ({ckpt['stage']}, step {ckpt['step']}) | temperature {temperature} | top_k {args.top_k} | "
      f"top_p {args.top_p} | max_new_tokens {max_new_tokens} | seed {args.seed}")
rows = continuations(policy, args.ckpt)
if compare is None:
    print_samples([{"prompt": p, **row} for p, row in zip(prompts, rows)], width=WIDTH, max_chars=10_000)
else:
    print("-" * WIDTH)
    for prompt, row, other in zip(prompts, rows, continuations(compare, args.compare)):
        print_side_by_side(prompt, row, other, f"[{args.ckpt}]", f"[{args.compare}]")
if rm_note:
    print(rm_note)
