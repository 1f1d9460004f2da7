"""Kernel launches of one training step per method, counted on any device (no GPU needed).

On an H200 (commit 93d8659, ``results/NVIDIA-H200``) the fused steps were bound by the host, not
by their kernels: ~35 us of host time per launch. A launch is one ATen operator that runs a
kernel (views, reshapes and allocations do not), so counting those operators with a
``TorchDispatchMode`` over a step on the CPU gives the launch count the same compositions make
on CUDA -- except where CUDA fuses what the CPU decomposes (``F.dropout`` is one kernel each way
there, three and one here) and for Triton kernels, which the CPU cannot run: the fused rows run
under ``backend="dense"`` (``auto``'s CUDA choice for every method but FacT, whose ``auto`` is
Triton -- its rows here are its dense composition).

The model is a 12-block timm ViT of width 128 at 32 px (patch 8): the launch count of a step does
not depend on the width or the token count, and compute stays small. A step is forward under
bf16 autocast, cross-entropy, backward, foreach AdamW (the CUDA default) and
``zero_grad(set_to_none=True)``.

``python -m benchmarks.launches [rows...]`` prints a Markdown table (rows: ``floor``, ``lora``,
``full`` and ``<method>:fused`` / ``<method>:reference``; all by default);
``tests/test_launches.py`` uses :data:`NO_LAUNCH` and :class:`Launches`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# operators that launch no kernel (metadata, views, allocation)
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "expand", "as_strided", "detach", "permute", "slice",
    "select", "unsqueeze", "squeeze", "alias", "split", "split_with_sizes", "unbind", "narrow", "empty",
    "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_local_scalar_dense",
    "is_same_size", "_has_compatible_shallow_copy_type",
}


class Launches(TorchDispatchMode):
    """Records the name of every ATen operator that launches a kernel."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


ANCHORS = ("floor", "lora", "full")
# the small model's configs where a method's default needs a wider model (Compacter: k = d/32 = 4)
CONFIG = {"compacter": dict(k=4)}


def default_rows() -> List[str]:
    import kron_kernels as kk

    return list(ANCHORS) + [f"{m}:{impl}" for m in kk.METHODS for impl in ("fused", "reference")]


def _step(row: str):
    import timm

    import kron_kernels as kk

    method, _, impl = row.partition(":")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              embed_dim=128, num_heads=2, depth=12)
    if method == "floor":
        model.requires_grad_(False)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        with contextlib.redirect_stdout(sys.stderr):
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"],
                                                     modules_to_save=["head"]))
    elif method != "full":
        model = kk.adapt(model, method, impl=impl or "fused", **CONFIG.get(method, {}))
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    if method == "floor":
        x.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def count(row: str) -> int:
    """Launches of one step of ``row`` (after two warm-up steps: AdamW's state exists)."""
    import kron_kernels as kk

    step = _step(row)
    with kk.use_backend("dense" if row.endswith(":fused") else "auto"):
        for _ in range(2):
            step()
        with Launches() as mode:
            step()
    return len(mode.ops)


def table(rows: Sequence[str]) -> str:
    counts: Dict[str, int] = {row: count(row) for row in rows}
    lines = ["| row | launches / step | over the floor |", "|---|---|---|"]
    floor = counts.get("floor")
    for row, n in counts.items():
        over = "" if floor is None or row == "floor" else f"{n - floor:+d}"
        lines.append(f"| `{row}` | {n:,} | {over} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help="rows (default: every anchor and method)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(table(args.rows or default_rows()))


if __name__ == "__main__":
    main()
