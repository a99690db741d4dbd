"""Coursework: the core pieces of RLHF, blanked out for a student to write back.

Each piece sits in the source between two comment lines,
    # BEGIN ASSIGNMENT <name>
    ...the reference solution...
    # END ASSIGNMENT
and has its own tests in tests/assignments/test_<name>.py. docs/assignments.md says,
for each one, what to read first, the equation and the bugs its tests catch.

python -m nanorlhf.assignments make OUTDIR [NAME...]      # a student copy: each region (all, or the NAMEs)
python -m nanorlhf.assignments make OUTDIR --track ppo    # ... or one stage's pieces (model, rm, ppo, dpo, pg)
python -m nanorlhf.assignments check [NAME...]            # run the assignments' tests, print the points
python -m nanorlhf.assignments check --hint NAME          # one more hint tier each call (--tier K: up to K)
python -m nanorlhf.assignments mutants [NAME...]          # instructor: every known wrong answer is caught

Tolerances (the dtype rule): a piece computes in the dtype of its inputs; the tests compare a result
at the tolerance of the coarser of its dtype and the expected one (float64 1e-10, float32 1e-5,
bfloat16/float16 1e-2, absolute and relative), so a float32 statistic of float64 inputs is right.
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

from nanorlhf.hints import HINTS  # name -> its hint tiers, in the order to do them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINT_STATE = ".hints.json"      # in a copy: how many hint tiers each assignment has shown
COPY_INFO = ".assignments.json"  # in a student copy: the assignments make blanked there, in order

# Tracks: the pieces a script needs, so a student can run one stage on their own code at once.
TRACKS = {
    "model": ["attention_kv_cache", "generate"],
    "rm": ["bradley_terry_loss", "reward_readout", "soft_bradley_terry_loss"],
    "ppo": ["kl_penalty_rewards", "compute_gae", "masked_whiten", "policy_loss", "value_loss", "adaptive_kl"],
    "dpo": ["dpo_loss"],
    "pg": ["kl_k3", "leave_one_out_baseline", "group_advantages"],
}
# the pieces each script runs (by its config class), checked before it writes anything (runtime.setup_runtime)
NEEDS = {"SFTConfig": TRACKS["model"], "RMConfig": TRACKS["model"] + TRACKS["rm"],
         "PPOConfig": TRACKS["model"] + TRACKS["rm"] + TRACKS["ppo"], "DPOConfig": TRACKS["model"] + TRACKS["dpo"],
         "PGConfig": TRACKS["model"] + TRACKS["rm"] + TRACKS["pg"],
         "EvalConfig": TRACKS["model"] + TRACKS["rm"], "StudyConfig": list(HINTS)}

# A region: its marker lines and everything between them. The raise that replaces it keeps the
# BEGIN line's indentation, so it is the whole body of the block the region sits in.
REGION = re.compile(r"^( *)# BEGIN ASSIGNMENT (\w+)\n.*?^ *# END ASSIGNMENT\n", re.S | re.M)

# Never copied into a student copy: run outputs, caches, and this tool's own test (paths from the
# repository root), and folders of these names anywhere.
# The instructor's files (the mutants, the reference answers) never reach a student copy either.
EXCLUDE_PATHS = {"out", "data/cache", ".whl", "tests/test_assignments.py", "nanorlhf/mutants.py",
                 "nanorlhf/mutants_pg.py", "nanorlhf/mutants_ppo.py",
                 "docs/instructor.md", HINT_STATE, COPY_INFO}
EXCLUDE_NAMES = {".git", "__pycache__", ".pytest_cache"}


def section(name):
    """Its section of docs/assignments.md: '## <k>. <name> — ...'."""
    return f"docs/assignments.md, section {list(HINTS).index(name) + 1} ({name})"


def hint_line(name):
    """The whole text of the raise in a student copy: the assignment and where to read, no code."""
    return f"{name}: not written yet; read {section(name)}; hints: python -m nanorlhf.assignments check --hint {name}"


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


def make(out_dir, names=None, repo=REPO, track=None):
    """Write a student copy of repo to out_dir with the regions of names (default all, or those of track)
    blanked."""
    if track is not None:
        if track not in TRACKS:
            raise SystemExit(f"unknown track {track!r}: known are {list(TRACKS)}")
        names = sorted(set(names or ()) | set(TRACKS[track]), key=list(HINTS).index)
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
    with open(os.path.join(out_dir, COPY_INFO), "w") as f:
        json.dump({"assignments": blanked}, f)
    print(f"student copy in {out_dir}: {len(paths)} files, {len(blanked)} assignments blanked "
          f"({', '.join(blanked)})")
    print(f"next: cd {out_dir} && python -m nanorlhf.assignments check")


def copy_assignments(repo=REPO):
    """The assignments of this copy, in order: those make blanked here, or all of them in the repository."""
    try:
        with open(os.path.join(repo, COPY_INFO)) as f:
            return [n for n in json.load(f)["assignments"] if n in HINTS]
    except (OSError, ValueError, KeyError):
        return list(HINTS)


def not_written(names, repo=REPO):
    """The names whose raise still stands in the source of this copy (cheap: reads nanorlhf/*.py)."""
    folder = os.path.join(repo, "nanorlhf")
    source = ""
    for f in sorted(os.listdir(folder)):
        if f.endswith(".py") and f not in ("assignments.py", "mutants.py"):
            with open(os.path.join(folder, f)) as fh:
                source += fh.read()
    return [n for n in names if f"raise NotImplementedError({json.dumps(hint_line(n))})" in source]


def require(cfg, script=None):
    """Stop a script before it writes anything when a piece it runs is still blanked: one line that names
    the assignment and its docs section (called by runtime.setup_runtime)."""
    missing = not_written(NEEDS.get(type(cfg).__name__, ()))
    if missing:
        script = script or os.path.basename(sys.argv[0]) or "this script"
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise SystemExit(f"{script} needs assignment {missing[0]}{more}, not written yet: read "
                         f"{section(missing[0])}, then python -m nanorlhf.assignments check {missing[0]}")


def run_tests(names, repo=REPO, timeout=900):
    """Run tests/assignments/test_<name>.py of each name in one pytest process. Returns {name: {"passed",
    "total", "failures": [(test, first line of its message)], "error": why the file did not load, or None}}."""
    files = [os.path.join("tests", "assignments", f"test_{n}.py") for n in names]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        # a file that does not import (a syntax error in the module it tests) costs only its own tests
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", "--continue-on-collection-errors", *files],
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
    """Print a table of points (one per test passed), what each failing test says, and the next
    assignment to do; True when all are done."""
    names = list(names or copy_assignments(repo))
    unknown = [n for n in names if n not in HINTS]
    if unknown:
        raise SystemExit(f"unknown assignment(s) {unknown}: known are {list(HINTS)}")
    results = run_tests(names, repo)
    statuses = {n: status(n, results[n]) for n in names}
    width = max(len(n) for n in names) + 2
    print(f"{'assignment':<{width}} {'points':>8}  status")
    for n in names:
        print(f"{n:<{width}} {results[n]['passed']:>4}/{results[n]['total']:<3}  {statuses[n]}")
    passed, total = sum(r["passed"] for r in results.values()), sum(r["total"] for r in results.values())
    done = sum(s == "done" for s in statuses.values())
    print(f"{'total':<{width}} {passed:>4}/{total:<3}  {done}/{len(names)} assignments done")
    shown = set()
    for n in names:
        if statuses[n] in ("failing", "did not load"):
            failures = results[n]["failures"] or [("(import)", results[n]["error"])]
            print(f"\n{n}: {len(failures)} test(s) failing, one point each")
            for test, message in failures:
                message = message or ""
                print(f"  {test}: " + ("the same error as above" if message in shown else
                                        message[:300].replace("\n", "\n    ")))
                shown.add(message)
            print(f"  details: python -m pytest -q tests/assignments/test_{n}.py")
    todo = [n for n in names if statuses[n] != "done"]
    if todo:
        print(f"\nnext: {todo[0]} ({statuses[todo[0]]}): read {section(todo[0])}; "
              f"hints: python -m nanorlhf.assignments check --hint {todo[0]}")
    return done == len(names)


def hint(name, tier=None, repo=REPO):
    """Print the hints of name up to tier (default: one more than last time, remembered in HINT_STATE)."""
    if name not in HINTS:
        raise SystemExit(f"unknown assignment {name!r}: known are {list(HINTS)}")
    tiers = HINTS[name]
    path = os.path.join(repo, HINT_STATE)
    try:
        with open(path) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    if tier is None:
        tier = min(seen.get(name, 0) + 1, len(tiers))
    if not 1 <= tier <= len(tiers):
        raise SystemExit(f"{name} has hint tiers 1 to {len(tiers)}, not {tier}")
    for k in range(1, tier + 1):
        print(f"{name} hint {k}/{len(tiers)}: {tiers[k - 1]}")
    seen[name] = max(seen.get(name, 0), tier)
    if seen[name] < len(tiers):
        print(f"(the next call shows hint {seen[name] + 1}; the equation and its paper are in {section(name)})")
    with open(path, "w") as f:
        json.dump(seen, f)
    return tier


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write a student copy with the assignments blanked")
    make_parser.add_argument("out_dir")
    make_parser.add_argument("names", nargs="*", help=f"assignments to blank (default all): {' '.join(HINTS)}")
    make_parser.add_argument("--track", choices=list(TRACKS), help="blank only the pieces of one stage: "
                             + "; ".join(f"{t}: {' '.join(ns)}" for t, ns in TRACKS.items()))
    check_parser = commands.add_parser("check", help="run the assignments' tests and print the points")
    check_parser.add_argument("names", nargs="*", help="assignments to check (default those of this copy)")
    check_parser.add_argument("--hint", metavar="NAME", help="show the next hint tier of NAME instead")
    check_parser.add_argument("--tier", type=int, help="with --hint: show the hints up to this tier")
    mutants_parser = commands.add_parser("mutants", help="instructor: plant each known wrong answer, check "
                                                         "that its named test catches it")
    mutants_parser.add_argument("names", nargs="*", help="assignments (default all)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out_dir, args.names or None, track=args.track)
    elif args.command == "mutants":  # its own process: the instructor's module, which imports this one
        if not os.path.exists(os.path.join(REPO, "nanorlhf", "mutants.py")):
            raise SystemExit("the mutants are the instructor's (nanorlhf/mutants.py): a student copy has none")
        sys.exit(subprocess.run([sys.executable, "-m", "nanorlhf.mutants", *args.names], cwd=REPO).returncode)
    elif args.hint:
        hint(args.hint, args.tier)
    else:
        sys.exit(0 if check(args.names) else 1)


if __name__ == "__main__":
    main()
