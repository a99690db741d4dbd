"""Coursework: the core pieces of RLHF, blanked out for a student to write back.

Each piece sits in the source between two comment lines,
    # BEGIN ASSIGNMENT <name>
    ...the reference solution...
    # END ASSIGNMENT
and has its own tests in tests/assignments/test_<name>.py. docs/assignments.md says,
for each one, what to read first, the equation and the bugs its tests catch.

python -m nanorlhf.assignments make OUTDIR [NAME...]   # a student copy of the repository: each
                                                       # region (all, or the NAMEs) becomes a raise
python -m nanorlhf.assignments check [NAME...]         # run the assignments' tests, print a score table
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> the one-line hint a student copy raises. Listed in the order to do them.
HINTS = {
    "attention_kv_cache": "with a kv_cache, write k, v into it (kv_cache.update(layer, k, v, columns)) and attend "
                          "over every cached key; y = softmax(q k^T / sqrt(hd) + attn_bias) v, dropout only in "
                          "training",
    "generate": "each step: draw (token, logprob) with sample_token, force finished rows to eos_id, append "
                "token/logprob/finished-before-this-token, update finished, stop after the last step (or when "
                "every row ended), mark the new cache column real, feed the token at the next position",
    "bradley_terry_loss": "losses = -logsigmoid(r_chosen - r_rejected); return their mean, or "
                          "sum(losses * weights) / sum(weights)",
    "reward_readout": "the column of the last real token of [prompt | response]: "
                      "P + last_token_index(response_mask), or P - 1 when the response is empty",
    "kl_penalty_rewards": "rewards = -kl_coef * (logprobs - ref_logprobs) on real tokens, 0 on padding, "
                          "plus scores[b] at row b's last real token (none for an empty row)",
    "compute_gae": "backwards over t: delta = r_t + gamma * V_{t+1} - V_t (V after the last real token is 0), "
                   "A_t = delta + gamma * lam * A_{t+1}; returns = A + V; both 0 on padding",
    "masked_whiten": "(x - masked_mean) / sqrt(biased masked_var + 1e-8) over real tokens; add the mean back "
                     "when not shift_mean; 0 on padding",
    "policy_loss": "ratio = exp(logprobs - old_logprobs); loss = masked mean of max(-A*ratio, -A*clip(ratio, "
                   "1-clip, 1+clip)); stats clipfrac, approx_kl, ratio as in the comment above",
    "value_loss": "V_clip = old_values + clamp(values - old_values, -clip, clip); loss = 0.5 * masked mean of "
                  "max((V - R)^2, (V_clip - R)^2); stats value_clipfrac",
    "adaptive_kl": "error = clip(current_kl / target - 1, -0.2, 0.2); self.value *= 1 + error * n_steps / horizon",
    "dpo_loss": "losses = -logsigmoid(beta * ((pc - rc) - (pr - rr))); chosen/rejected rewards = "
                "beta * (policy - ref) logps, detached",
}

# A region: its marker lines and everything between them. The raise that replaces it keeps the
# BEGIN line's indentation, so it is the whole body of the block the region sits in.
REGION = re.compile(r"^( *)# BEGIN ASSIGNMENT (\w+)\n.*?^ *# END ASSIGNMENT\n", re.S | re.M)

# Never copied into a student copy: run outputs, caches, and this tool's own test (paths from the
# repository root), and folders of these names anywhere.
EXCLUDE_PATHS = {"out", "data/cache", ".whl", "tests/test_assignments.py"}
EXCLUDE_NAMES = {".git", "__pycache__", ".pytest_cache"}


def hint_line(name):
    return f"{name}: {HINTS[name]}; see docs/assignments.md"


def raise_line(name, indent=""):
    """What replaces the region of name in a student copy."""
    return f"{indent}raise NotImplementedError({json.dumps(hint_line(name))})\n"  # a double-quoted literal


def find_regions(source):
    """{name: the region's text, marker lines included} of one source file."""
    found = {}
    for m in REGION.finditer(source):
        if m.group(2) in found:
            raise ValueError(f"assignment {m.group(2)} is marked twice in one file: one region per name")
        found[m.group(2)] = m.group(0)
    return found


def blank(source, names=None):
    """The source with each region (all, or those in names) replaced by raise NotImplementedError(hint)."""
    def replace(m):
        indent, name = m.group(1), m.group(2)
        if name not in HINTS:
            raise ValueError(f"unknown assignment {name!r}: add its hint to HINTS in nanorlhf/assignments.py")
        if names is not None and name not in names:
            return m.group(0)
        return raise_line(name, indent)
    return REGION.sub(replace, source)


def excluded(path):
    return (any(part in EXCLUDE_NAMES for part in path.split("/")) or path.endswith(".pyc")
            or any(path == e or path.startswith(e + "/") for e in EXCLUDE_PATHS))


def repo_files(repo=REPO):
    """Paths (relative to repo, with /) of the files a student copy holds: git's tracked and
    untracked but not ignored files, or without git every file; never the excluded ones."""
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
        paths = [p for p in out.split("\0") if p and os.path.isfile(os.path.join(repo, p))]
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout
        paths = []
        for root, dirs, files in os.walk(repo):
            rel = os.path.relpath(root, repo).replace(os.sep, "/")
            dirs[:] = [d for d in dirs if not excluded(os.path.normpath(f"{rel}/{d}").replace(os.sep, "/"))]
            paths += [os.path.normpath(f"{rel}/{f}").replace(os.sep, "/") for f in files]
    return sorted(p for p in paths if not excluded(p))


def marked_files(repo, paths):
    """{path: {name: region}} over the python files that hold regions (tests and this file aside)."""
    marked = {}
    for path in paths:
        if not path.endswith(".py") or path.startswith("tests/") or path == "nanorlhf/assignments.py":
            continue
        with open(os.path.join(repo, path)) as f:
            regions = find_regions(f.read())
        if regions:
            marked[path] = regions
    return marked


def make(out_dir, names=None, repo=REPO):
    """Write a student copy of repo to out_dir with the regions of names (default all) blanked."""
    out_dir = os.path.abspath(out_dir)
    if out_dir == repo or out_dir.startswith(repo + os.sep):
        raise SystemExit(f"{out_dir} is inside the repository: choose a directory outside {repo}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} is not empty: choose a new directory or remove it first")
    paths = repo_files(repo)
    marked = marked_files(repo, paths)
    where = {name: path for path, regions in marked.items() for name in regions}
    if not where:
        raise SystemExit(f"no '# BEGIN ASSIGNMENT' regions in {repo}: is it already a student copy?")
    unknown = sorted(set(where) - set(HINTS)) + sorted(set(names or ()) - set(HINTS))
    if unknown:
        raise SystemExit(f"unknown assignment(s) {unknown}: known are {list(HINTS)}")
    missing = sorted(set(HINTS) - set(where))
    if missing:
        raise SystemExit(f"assignment(s) {missing} have no region in the source: mark them or drop their hints")
    for path in paths:
        dest = os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if path not in marked:
            shutil.copy2(os.path.join(repo, path), dest)
            continue
        with open(os.path.join(repo, path)) as f:
            source = blank(f.read(), names)
        compile(source, path, "exec")  # a region that is not a whole body would break the module here
        with open(dest, "w") as f:
            f.write(source)
        shutil.copymode(os.path.join(repo, path), dest)
    blanked = [n for n in HINTS if names is None or n in names]
    print(f"student copy in {out_dir}: {len(paths)} files, {len(blanked)} assignments blanked "
          f"({', '.join(blanked)})")
    print(f"next: cd {out_dir} && python -m nanorlhf.assignments check")


def run_tests(names, repo=REPO, timeout=900):
    """Run tests/assignments/test_<name>.py of each name in one pytest process. Returns {name: {"passed",
    "total", "failures": [(test, first line of its message)], "error": why the file did not load, or None}}."""
    files = [os.path.join("tests", "assignments", f"test_{n}.py") for n in names]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        # a file that does not import (a syntax error in the module it tests) costs only its own tests
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               "--continue-on-collection-errors", *files],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(xml):
            raise SystemExit(f"pytest did not run:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        cases = list(ET.parse(xml).getroot().iter("testcase"))
    results = {n: {"passed": 0, "total": 0, "failures": [], "error": None} for n in names}
    for case in cases:
        parts = f"{case.get('classname')}.{case.get('name')}".split(".")
        name = next((n for n in names if f"test_{n}" in parts), None)
        if name is None:
            continue
        bad = next((case.find(tag) for tag in ("failure", "error") if case.find(tag) is not None), None)
        if not case.get("classname"):  # junit reports a file that did not import as one case without a class
            lines = [line[1:].rstrip() for line in (bad.text or "").splitlines() if line.startswith("E ")]
            results[name]["error"] = textwrap.dedent("\n".join(lines[-4:])) or bad.get("message")
            continue
        results[name]["total"] += 1
        if bad is None:
            results[name]["passed"] += case.find("skipped") is None
        else:
            results[name]["failures"].append((case.get("name"), (bad.get("message") or "").split("\n")[0]))
    return results


def status(name, result):
    if result["error"]:
        return "did not load"
    if result["total"] == 0:
        return "no tests"
    if result["passed"] == result["total"]:
        return "done"
    if result["passed"] == 0 and all(m.startswith(f"NotImplementedError: {name}:") for _, m in result["failures"]):
        return "not implemented"
    return "failing"


def check(names=None, repo=REPO):
    """Print a score table and the first failure of each failing assignment; True when all are done."""
    names = list(names or HINTS)
    unknown = [n for n in names if n not in HINTS]
    if unknown:
        raise SystemExit(f"unknown assignment(s) {unknown}: known are {list(HINTS)}")
    results = run_tests(names, repo)
    statuses = {n: status(n, results[n]) for n in names}
    width = max(len(n) for n in names) + 2
    print(f"{'assignment':<{width}} {'passed':>8}  status")
    for n in names:
        print(f"{n:<{width}} {results[n]['passed']:>4}/{results[n]['total']:<3}  {statuses[n]}")
    passed, total = sum(r["passed"] for r in results.values()), sum(r["total"] for r in results.values())
    done = sum(s == "done" for s in statuses.values())
    print(f"{'total':<{width}} {passed:>4}/{total:<3}  {done}/{len(names)} assignments done")
    shown = set()
    for n in names:
        if statuses[n] in ("failing", "did not load"):
            test, message = results[n]["failures"][0] if results[n]["failures"] else ("(import)", results[n]["error"])
            print(f"\n{n}: {test}\n  " + ("the same error as above" if message in shown else
                                            message[:500].replace("\n", "\n  ")))
            print(f"  details: python -m pytest -q tests/assignments/test_{n}.py")
            shown.add(message)
    return done == len(names)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write a student copy with the assignments blanked")
    make_parser.add_argument("out_dir")
    make_parser.add_argument("names", nargs="*", help=f"assignments to blank (default all): {' '.join(HINTS)}")
    check_parser = commands.add_parser("check", help="run the assignments' tests and print a score table")
    check_parser.add_argument("names", nargs="*", help="assignments to check (default all)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out_dir, args.names or None)
    else:
        sys.exit(0 if check(args.names) else 1)


if __name__ == "__main__":
    main()
