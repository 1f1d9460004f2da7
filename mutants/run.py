"""``make mutants``: plant each bug of ``mutants/mutants.py`` in a scratch copy of the repository
and report whether the tests (and the GPU-target compile check) catch it.

    python mutants/run.py [--only ID ...] [--list] [--jobs N] [--no-baseline] [--keep]

1. Checks the list: every (family, kind) has a mutant or a NOT_APPLICABLE reason, every edit's
   ``old`` text occurs exactly once in its file (else it stops: the list has rotted).
2. Copies the working tree (without .git, .venv, caches) to a temporary directory and runs the
   union of the mutants' test selections there unmutated, and their compile checks: they must
   pass, or a "killed" below would mean nothing.
3. For each mutant: applies its edits in the copy, runs ``pytest -x`` on its selection (the
   package imported from the copy: PYTHONPATH), then, where it names workloads, the compile
   check ``python -m kron_kernels.triton.targets --only ... --arch ...`` with the GPU machine's
   Triton (``--triton``, default ``.venv/triton-3.6.0``) and ``TRITON_INTERPRET`` unset;
   restores the files.
4. Prints one line per mutant (killed by which test or compile, or survived) with its time,
   and exits non-zero on an unexplained survivor, an explained one that was killed (stale
   explanation), or a failure of steps 1-2.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "mutants"))

from mutants import EXTRA_KINDS, FAMILIES, KINDS, MUTANTS, NOT_APPLICABLE, Mutant  # noqa: E402

IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".benchmarks", "build", "dist",
                                "*.egg-info", ".whl")
TIMEOUT_S = 600  # a mutant that hangs a test is killed (by timeout)


# ----------------------------------------------------------------------------------------
# checking the list
# ----------------------------------------------------------------------------------------
def check_list(mutants) -> list:
    """Problems with the list (empty: fine)."""
    problems = []
    ids = [m.id for m in mutants]
    problems += [f"duplicate id {i}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for m in mutants:
        if m.family not in FAMILIES or (m.kind not in KINDS and m.kind not in EXTRA_KINDS):
            problems.append(f"{m.id}: unknown family {m.family!r} or kind {m.kind!r}")
        if not m.tests:
            problems.append(f"{m.id}: no tests")
        for file, old, new in m.edits:
            path = REPO / file
            if not path.is_file():
                problems.append(f"{m.id}: {file} does not exist")
                continue
            count = path.read_text().count(old)
            if count != 1:
                problems.append(f"{m.id}: the text to replace occurs {count} times in {file} (must be once):\n"
                                f"      {old.strip()[:120]!r}")
            if old == new:
                problems.append(f"{m.id}: an edit that changes nothing")
    for family in FAMILIES:
        for kind in KINDS:
            have = any(m.family == family and m.kind == kind for m in MUTANTS)
            if not have and (family, kind) not in NOT_APPLICABLE:
                problems.append(f"no {kind} mutant for {family} (add one, or a NOT_APPLICABLE reason)")
            if have and (family, kind) in NOT_APPLICABLE:
                problems.append(f"{family}/{kind} has a mutant and a NOT_APPLICABLE reason")
    return problems


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------
def _env(copy: Path, interpret: bool, side_triton: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "KRON_KERNELS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [side_triton, str(copy)]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["TRITON_CACHE_DIR"] = str(copy.parent / "triton-cache")  # mutated kernels hash differently
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(cmd, copy: Path, env: dict):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", out, time.perf_counter() - t0


def run_tests(copy: Path, tests, stop_first: bool = True):
    """``(verdict, detail, seconds)``: verdict "pass", "fail" (detail: the first failure) or "error"."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf"]
    cmd += (["-x"] if stop_first else []) + list(tests)
    rc, out, seconds = _run(cmd, copy, _env(copy, interpret=True))
    if rc == 0:
        return "pass", "", seconds
    if rc == 5:
        return "error", "no tests collected (a node id no longer exists?)", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)
    errors = re.findall(r"^E +(\S.*)$", out, re.M)
    if rc == 1 and failed:
        return "fail", f"{failed[0]}: {errors[0][:110]}" if errors else failed[0], seconds
    if rc == "timeout":
        return "fail", f"timeout after {TIMEOUT_S} s", seconds
    tail = " | ".join(line for line in out.strip().splitlines()[-3:])
    return "fail", f"exit {rc}: {tail[-300:]}", seconds


def run_compile(copy: Path, workloads, arch, side_triton: str):
    """``(verdict, detail, seconds)`` of the compile check for ``workloads`` (label substrings)."""
    cmd = [sys.executable, "-m", "kron_kernels.triton.targets", "--quiet", "--jobs", "1",
           "--arch", *map(str, arch), "--only", *workloads]
    rc, out, seconds = _run(cmd, copy, _env(copy, interpret=False, side_triton=side_triton))
    if rc == 0:
        return "pass", "", seconds
    fails = [line for line in out.splitlines() if " FAIL " in line]
    detail = fails[0] if fails else " | ".join(out.strip().splitlines()[-2:])[-300:]
    return "fail", detail.strip(), seconds


def _apply(copy: Path, m: Mutant):
    saved = {}
    for file, old, new in m.edits:
        path = copy / file
        text = path.read_text()
        saved.setdefault(file, text)  # the original, before this mutant's first edit of the file
        if text.count(old) != 1:
            raise RuntimeError(f"{m.id}: the text to replace is not in the copy of {file} exactly once")
        path.write_text(text.replace(old, new))
    return saved


def _restore(copy: Path, saved: dict):
    for file, text in saved.items():
        (copy / file).write_text(text)


def run_mutant(copy: Path, m: Mutant, side_triton: str) -> dict:
    saved = _apply(copy, m)
    try:
        t0 = time.perf_counter()
        verdict, detail, _ = run_tests(copy, m.tests)
        result = {"tests": (verdict, detail)}
        if m.compile:
            result["compile"] = run_compile(copy, m.compile, m.arch, side_triton)[:2]
        result["seconds"] = time.perf_counter() - t0
    finally:
        _restore(copy, saved)
    killers = []
    if verdict in ("fail", "error"):
        killers.append(f"test {detail}")
    if "compile" in result and result["compile"][0] == "fail":
        killers.append(f"compile ({result['compile'][1]})")
    result["killed"] = bool(killers)
    result["killers"] = killers
    return result


def make_copy(root: Path, name: str) -> Path:
    copy = root / name
    shutil.copytree(REPO, copy, ignore=IGNORE, symlinks=True)
    return copy


def check_imports_from(copy: Path):
    code = "import kron_kernels, sys; print(kron_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy, interpret=True), capture_output=True,
                         text=True).stdout.strip()
    if not out.startswith(str(copy)):
        raise SystemExit(f"the copy imports kron_kernels from {out!r}, not from {copy}: mutants would not be tested")


def _describe(m: Mutant, result: dict) -> str:
    if result["killed"]:
        status = "killed"
        if m.survives:
            status = "KILLED (stale explanation)"
        how = "; ".join(result["killers"])
    else:
        status = "survived (explained)" if m.survives else "SURVIVED"
        how = m.survives if m.survives else "no test and no compile check failed"
    cpu = "" if result["tests"][0] != "pass" else "CPU suite passed; "
    return f"{m.id:34s} {m.kind:12s} {status:26s} {result['seconds']:6.1f} s  {cpu}{how}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="mutant ids to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel, one scratch copy each")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--triton", default=str(REPO / ".venv" / "triton-3.6.0"),
                        help="site-packages folder with the GPU machine's Triton, for the compile checks")
    args = parser.parse_args(argv)

    problems = check_list(MUTANTS)
    if problems:
        print("mutants/mutants.py needs updating:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    unknown = set(args.only or ()) - {m.id for m in MUTANTS}
    if unknown:
        print(f"unknown mutant ids: {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:34s} {m.family:10s} {m.kind:12s} {m.what}")
        return 0
    # absolute: the compile checks run in the scratch copies, where a relative PYTHONPATH entry
    # (make's .venv/triton-3.6.0) names nothing and the installed Triton would answer instead
    # (Triton 3.8 compiles the K = 8 dots 3.6 rejects: the compile mutants survived that way)
    args.triton = str(Path(args.triton).resolve())
    if any(m.compile for m in mutants) and not Path(args.triton, "triton").is_dir():
        print(f"no Triton at {args.triton} for the compile checks: `make test` installs it, or\n"
              f"  {sys.executable} -m pip install --no-deps --target {args.triton} triton==3.6.0", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="kron-mutants-"))
    try:
        copies = [make_copy(root, f"copy{i}") for i in range(max(1, min(args.jobs, len(mutants))))]
        check_imports_from(copies[0])
        print(f"{len(mutants)} mutants; scratch copies in {root}", flush=True)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            verdict, detail, seconds = run_tests(copies[0], tests, stop_first=False)
            print(f"baseline: {len(tests)} test selections on the unmutated copy: {verdict} ({seconds:.0f} s)",
                  flush=True)
            if verdict != "pass":
                print(f"the unmutated tree fails its mutants' tests ({detail}): fix that first", file=sys.stderr)
                return 2
            for workloads, arch in dict.fromkeys((m.compile, m.arch) for m in mutants if m.compile):
                verdict, detail, seconds = run_compile(copies[0], workloads, arch, args.triton)
                targets = ", ".join(f"sm_{a}" for a in arch)
                print(f"baseline: compile {' | '.join(workloads)} for {targets}: {verdict} ({seconds:.0f} s)", flush=True)
                if verdict != "pass":
                    print(f"the unmutated tree fails the compile check: {detail}", file=sys.stderr)
                    return 2

        results = {}
        if len(copies) == 1:
            for m in mutants:
                results[m.id] = run_mutant(copies[0], m, args.triton)
                print(_describe(m, results[m.id]), flush=True)
        else:
            free = list(copies)

            def work(m):
                copy = free.pop()
                try:
                    return m, run_mutant(copy, m, args.triton)
                finally:
                    free.append(copy)

            with concurrent.futures.ThreadPoolExecutor(len(copies)) as pool:
                for m, result in pool.map(work, mutants):
                    results[m.id] = result
                    print(_describe(m, result), flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    unexplained = [m.id for m in mutants if not results[m.id]["killed"] and not m.survives]
    stale = [m.id for m in mutants if results[m.id]["killed"] and m.survives]
    killed = sum(r["killed"] for r in results.values())
    explained = sum(1 for m in mutants if not results[m.id]["killed"] and m.survives)
    minutes = (time.perf_counter() - t_start) / 60
    print(f"\n{len(mutants)} mutants: {killed} killed, {explained} survived with an explanation, "
          f"{len(unexplained)} unexplained survivors; {minutes:.1f} min")
    for (family, kind), why in NOT_APPLICABLE.items():
        print(f"not applicable: {family}/{kind}: {why}")
    if unexplained:
        print(f"UNEXPLAINED SURVIVORS (kill them with a test, or explain them in mutants/mutants.py): {unexplained}",
              file=sys.stderr)
    if stale:
        print(f"killed although explained as survivors (remove the explanation): {stale}", file=sys.stderr)
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main())
