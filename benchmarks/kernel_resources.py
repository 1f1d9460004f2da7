"""Registers, spill stack and shared memory of the Triton kernels at ViT sizes, without a GPU.

    python -m benchmarks.kernel_resources [--arch 90] [--only "ViT-B"]

The launches are the launchers' own (``kron_kernels.triton.targets`` records them on fake
CUDA tensors for the target's SM count and shared memory), compiled for ``sm_<arch>`` and read
off ptxas through the cuobjdump that ships with Triton: the first question to answer about a
kernel before timing it, and one a machine without a GPU can answer. Resource use is not
speed: only a GPU measurement decides a configuration (DEVELOPERS.md, "What the first GPU
run taught").
"""
from __future__ import annotations

import argparse
import os
import sys

from kron_kernels.triton import targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(targets.TARGETS))
    parser.add_argument("--only", nargs="*", default=["ViT-B"],
                        help="workloads whose label contains any of these substrings (default: ViT-B)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    report = targets.check([args.arch], args.only, resources=True, log=print)
    failures = [e for t in report["targets"].values() for e in t["launches"] if not e["ok"]]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
