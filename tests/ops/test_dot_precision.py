"""The precision every Triton ``tl.dot`` is launched with, checked on the CPU.

The interpreter ignores ``input_precision``, so no numerical CPU test can tell an IEEE fp32 dot
from a TF32 one (10 mantissa bits: ~1e-3 relative error, against the 1e-4 fp32 tolerance of
``utils.RTOL``). The rule of the launchers (triton/kron.py ``_meta`` and triton/bottleneck.py, the
Compacter adapter's kernels included, all through ``kron_kernels.triton.dot_precision``):
fp32 activations keep IEEE fp32 dots; bf16 activations, which carry 2^-8 of error already, take
TF32 tensor-core dots (2^-11 on the fp32 factors and intermediates); fp16 activations take
3xTF32, since a TF32 rounding is as large as fp16's own (plain TF32 failed the fp16
low-precision tests on an H200, commit 93d8659). Here the public ops run on fake CUDA tensors
for an H100
(``kron_kernels.triton.targets.record_launches``: every launch recorded, not run) and every
recorded kernel that takes a ``DOT_PRECISION`` must have the rule's. On a GPU,
``test_gpu_fp32`` / ``test_cuda_vit_sizes`` / ``test_cuda_arc_vit_sizes`` / ``test_cuda_vit_b``
check the numbers the rule protects.

The recording needs compiled-mode Triton (the interpreter replaces the kernels' launch path),
so it runs in a subprocess without ``TRITON_INTERPRET``.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# workload labels of kron_kernels.triton.targets, every op with a tl.dot, in fp32, bf16 and fp16
_BASE = [
    "kron_linear ViT-B-r4 fp32", "kron_linear ViT-B-r4 bf16",
    "kron_matmul ViT-B-r1 fp32", "kron_matmul ViT-B-r1 bf16",
    "kron_linear_slices qv ViT-S-r1 fp32", "kron_linear_slices qv ViT-S-r1 bf16",
    "bottleneck_adapter ViT-B-k24 fp32", "bottleneck_adapter ViT-B-k24 bf16",
    "arc ViT-B r50 p0.1 fp32", "arc ViT-B r50 p0.1 bf16",
    "losa_mixer ViT-B token T197 dz fp32", "losa_mixer ViT-B token T197 dz bf16",
    "losa_mixer ViT-B channel T197 fp32", "losa_mixer ViT-B channel T197 bf16",
    "fact_linear ViT-B r8 rows3 p0.1 fp32", "fact_linear ViT-B r8 rows3 p0.1 bf16",
    "fact_apply ViT-B r8 cols4 p0.1 fp32", "fact_apply ViT-B r8 cols4 p0.1 bf16",
]
WORKLOADS = _BASE + [w[: -len("bf16")] + "fp16" for w in _BASE if w.endswith("bf16")]
# fp32 activations inside a 16-bit autocast region (the residual stream of a timm ViT): the
# dots take the autocast dtype's precision on the fp32 tiles
WORKLOADS += [f"{w} fp32 autocast-{dt}" for w in ("bottleneck_adapter ViT-B-k24", "arc ViT-B r50 p0.1",
                                                  "losa_mixer ViT-B channel T197", "losa_mixer ViT-B token T197")
              for dt in ("bf16", "fp16")]
WANT = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32x3", "autocast-bf16": "tf32", "autocast-fp16": "tf32x3"}

_RECORD = """
    import json, sys
    from kron_kernels.triton import targets

    wanted = json.loads(sys.argv[1])
    found = {}
    with targets.record_launches(targets.TARGETS[90]) as recording:
        for label, call in targets.workloads():
            if label.endswith(" no-dx") or label.endswith(" no-dh") or not any(label == w for w in wanted):
                continue
            recording.label = label
            call()
    for launch in recording.launches:
        bound = launch.bound()
        if "DOT_PRECISION" in bound:
            found.setdefault(launch.workload, []).append([launch.name, bound["DOT_PRECISION"]])
    print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def recorded():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_RECORD), json.dumps(WORKLOADS)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.replace(" ", "-") for w in WORKLOADS])
def test_dot_precision_follows_the_activations(recorded, workload):
    assert workload in recorded, f"no launch with a DOT_PRECISION recorded for {workload!r}"
    want = WANT[workload.rsplit(" ", 1)[1]]
    wrong = [(kernel, precision) for kernel, precision in recorded[workload] if precision != want]
    assert not wrong, f"{workload}: kernels launched with another dot precision than {want!r}: {wrong}"
