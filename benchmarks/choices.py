"""Which implementation won each measured case: the evidence behind ``auto``'s CUDA choices.

A report run times some cases with more than one implementation: ``fused`` (whatever ``auto``
took; its backend column names it) beside ``triton``, ``cuda`` (the compiled extension),
``cublas`` / ``dense`` (the dense cuBLAS composition) or ``fused_v2`` (Fastfood generator 2).
No kernel becomes ``auto``'s CUDA default before a GPU measurement shows it beating the
alternatives, and the measurement is recorded next to the choice (DESIGN.md 5: the
``_CUDA_AUTO`` tables in ``kron_kernels/ops``). This module reads a run's JSON files and says,
per case, which implementation was fastest and whether ``auto`` took it:

    python -m benchmarks.choices benchmarks/results/NVIDIA-H100/

The report writes the same table to ``choices.md`` beside the suites' files, from every suite
of the same commit in that folder (the GPU session's separate report calls add up). A case counts as
"auto should switch" only when an alternative's median beats auto's by more than
:data:`MARGIN` and their p20-p80 ranges do not overlap; otherwise it is kept, or "within noise".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["IMPLEMENTATIONS", "MARGIN", "Choice", "choices", "choices_markdown", "load", "main"]

# the variants that are implementations of the op (not the reference, the floor or PEFT), and
# what each is called in the choice tables
IMPLEMENTATIONS = {"fused": "auto", "triton": "triton", "cuda": "cuda", "cublas": "dense", "dense": "dense",
                   "fused_v2": "generator 2"}
MARGIN = 0.05  # an alternative must be this much faster (median) before auto is told to switch


@dataclasses.dataclass(frozen=True)
class Choice:
    """One case timed with auto's choice (``fused``) and at least one alternative."""

    suite: str
    case: str
    auto_backend: str  # what auto dispatched to (the fused row's backend column)
    auto_ms: float
    best: str  # the fastest variant ("fused" when auto's choice was fastest)
    best_ms: float
    overlap: bool  # the two p20-p80 ranges overlap

    @property
    def ratio(self) -> float:
        """auto's median over the fastest's (1.0 when auto was fastest)."""
        return self.auto_ms / self.best_ms

    @property
    def verdict(self) -> str:
        if self.best == "fused":
            return "auto fastest"
        # auto's backend column: "op:impl" per dispatch it observed, comma-separated
        took = {part.rsplit(":", 1)[-1].strip() for part in self.auto_backend.split(",") if ":" in part}
        if IMPLEMENTATIONS[self.best] in took:
            return f"auto took it ({IMPLEMENTATIONS[self.best]})"
        if self.ratio <= 1.0 + MARGIN or self.overlap:
            return f"keep (within noise of {IMPLEMENTATIONS[self.best]})"
        return f"auto should take {IMPLEMENTATIONS[self.best]}: {self.ratio:.2f}x faster"


def _ok(row: Mapping) -> bool:
    return row.get("status") == "ok" and row.get("median_ms") is not None


def choices(rows: Sequence[Mapping]) -> List[Choice]:
    """The cases among ``rows`` (the JSON rows of any suites) with auto's row and at least one
    alternative implementation measured, in the rows' order."""
    cases: Dict[tuple, Dict[str, Mapping]] = {}
    for row in rows:
        if row.get("variant") in IMPLEMENTATIONS and _ok(row):
            cases.setdefault((row["suite"], row["case"]), {})[row["variant"]] = row
    found = []
    for (suite, case), by_variant in cases.items():
        auto = by_variant.get("fused")
        if auto is None or len(by_variant) < 2:
            continue
        best_variant, best = min(by_variant.items(), key=lambda kv: (kv[1]["median_ms"], kv[0] != "fused"))
        lo = [r.get("p20_ms", r["median_ms"]) for r in (auto, best)]
        hi = [r.get("p80_ms", r["median_ms"]) for r in (auto, best)]
        overlap = best_variant != "fused" and lo[0] <= hi[1] and lo[1] <= hi[0]
        found.append(Choice(suite, case, auto.get("backend", ""), auto["median_ms"], best_variant,
                            best["median_ms"], overlap))
    return found


def choices_markdown(rows: Sequence[Mapping], provenance: Optional[Mapping] = None) -> str:
    """A Markdown table of :func:`choices`, headed by the run's device and commit."""
    found = choices(rows)
    prov = provenance or {}
    lines = ["# Which implementation won (auto's choices against the alternatives)", ""]
    if prov:
        lines += [f"Measured on **{prov.get('device', '?')}**, commit `{str(prov.get('git_commit', '?'))[:12]}`, "
                  f"{prov.get('date_utc', '')}. Read with `python -m benchmarks.choices`; a choice table changes only "
                  "on such a measurement, recorded beside it (DESIGN.md 5).", ""]
    if not found:
        return "\n".join(lines + ["No case was timed with auto's choice beside an alternative implementation."]) + "\n"
    lines += ["| suite | case | auto took | auto ms | fastest | fastest ms | auto / fastest | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for c in found:
        lines.append(f"| {c.suite} | {c.case} | {c.auto_backend or '-'} | {c.auto_ms:.3g} | "
                     f"{IMPLEMENTATIONS[c.best]} | {c.best_ms:.3g} | {c.ratio:.2f}x | {c.verdict} |")
    switches = sum(c.verdict.startswith("auto should take") for c in found)
    lines += ["", f"{len(found)} cases with an alternative; {switches} where auto should switch."]
    return "\n".join(lines) + "\n"


def load(paths: Sequence[Path], commit: Optional[str] = None):
    """``(rows, provenance)`` of the JSON results in ``paths`` (folders: their ``*.json``), only
    those of ``commit`` when given (a folder may hold an older run's suites)."""
    rows, prov = [], {}
    for path in paths:
        for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            payload = json.loads(file.read_text())
            if not isinstance(payload, dict) or "rows" not in payload:
                continue
            file_prov = payload.get("provenance", {})
            if commit is not None and file_prov.get("git_commit") != commit:
                continue
            rows += payload["rows"]
            prov = prov or file_prov
    return rows, prov


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.choices", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a results folder (benchmarks/results/<device>/) or JSON files",
                        nargs="+")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folder if not f.exists()]
    if missing:
        raise SystemExit(f"no such file or folder: {' '.join(missing)}")
    rows, prov = load(args.folder)
    if not rows:
        raise SystemExit(f"no JSON results in {' '.join(map(str, args.folder))}")
    print(choices_markdown(rows, prov), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
