"""Training under DistributedDataParallel, and gradients that come back in their parameter's layout.

* Every method of ``kk.METHODS`` on a tiny ViT, and every Swin method on a tiny Swin, trains
  under ``torch.nn.parallel.DistributedDataParallel`` (no ``find_unused_parameters``): two
  processes on the gloo backend on CPU (NCCL on a machine with two GPUs, ``-m gpu``), each
  running forward+backward on its half of a fixed batch. The
  gradients after DDP's all-reduce equal a single-process step on the whole batch, every
  trainable tensor -- the shared factors (KAdaptation's ``A_q``/``A_v``, Compacter's ``A``,
  FacT's ``U``/``V``/cores, ARC's ``U_attn``/``U_mlp``) included -- is all-reduced exactly once
  per step (it is one Parameter, registered once, on ``model.kk_shared``), the ranks hold the
  same parameters after every optimizer step, and DDP never warns that a gradient's strides
  differ from its bucket view's.
* Every autograd Function returns each parameter's gradient with that parameter's strides, so
  neither ``AccumulateGrad`` nor DDP's bucketing copies it again (``ops._common.grad_like``).

The DDP runs use float64 models on the torch backend: the two-process and one-process
gradients then differ only by the order of a few sums (the per-rank means averaged vs one mean;
division by the world size 2 is exact), ~1e-16 relative, so the package-wide float64 tolerance
``RTOL[float64] = 1e-10`` is orders of magnitude above the rounding yet far below any real
error (a missing or doubled all-reduce is off by a factor, a wrong shard by O(1)).

Dropout: FacT and ARC default to dropout 0.1 on their r-dim intermediate. Its mask is drawn per
call for the rows of the local batch, so two half-batch masks cannot equal one full-batch mask;
the DDP runs therefore set ``dropout=0.0`` but keep the models in *training* mode, so the
training code paths (``training=True`` into the ops; timm's own dropouts are 0) are the ones
compared. The layout tests keep the default dropout.
"""
import datetime
import multiprocessing
import os
import time
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F

import kron_kernels as kk
from kron_kernels.ops._common import grad_like
from test_adapt import adapted, images, perturb, trainable
from test_swin import SWIN_METHODS, adapted as swin_adapted, images as swin_images
from utils import RTOL, assert_rel_close

HAS_CUDA = torch.cuda.is_available()
TRITON_RUNS = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it without CUDA

WORLD_SIZE = 2
PER_RANK = 2  # images per rank; the single-process reference takes all WORLD_SIZE * PER_RANK
STEPS = 2  # the second step fails under DDP if the first left a parameter unreduced
LR = 0.1
JOIN_TIMEOUT_S = 180  # both ranks, spawn and imports included (~10-20 s on 2 busy cores)
COLLECTIVE_TIMEOUT_S = 60  # a rank waiting in a collective for a dead peer errors out instead of hanging
STRIDE_WARNING = "Grad strides do not match bucket view strides"
DROPOUT_METHODS = ("fact_tt", "fact_tk", "arc")
# (backbone, method): every method on the tiny ViT, the Swin methods on the tiny Swin (Swin keeps
# width-dependent factors per stage, shared by that stage's blocks: more shared tensors to reduce)
DDP_CASES = [("vit", method) for method in kk.METHODS] + [("swin", method) for method in SWIN_METHODS]


# ---------------------------------------------------------------------------- the layout contract
def test_grad_like_copies_only_when_the_strides_differ():
    param = torch.empty(8, 8, 1, dtype=torch.float64)
    same = torch.randn(8, 8, 1, dtype=torch.float64)
    assert grad_like(same, param) is same
    # only a size-1 dim's stride differs (a transposed (8, 1, 8) result): a view, no copy
    size1 = torch.randn(8, 1, 8, dtype=torch.float64).transpose(1, 2)
    assert size1.stride() == (8, 1, 8)
    got = grad_like(size1, param)
    assert got.stride() == param.stride() and got.data_ptr() == size1.data_ptr() and torch.equal(got, size1)
    # a real transpose: one copy into the parameter's layout, in the parameter's dtype
    wide = torch.empty(64, 6)
    transposed = torch.randn(6, 64, dtype=torch.float64).t()
    got = grad_like(transposed, wide)
    assert got.stride() == wide.stride() and got.dtype == wide.dtype and torch.equal(got, transposed.float())
    # a parameter laid out column-major keeps that layout
    column_major = torch.empty(6, 64).t()
    got = grad_like(torch.randn(64, 6), column_major)
    assert got.stride() == column_major.stride()
    assert grad_like(None, param) is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", kk.METHODS)
def test_grads_have_their_parameters_strides(method, backend):
    """After a training-mode backward every trainable parameter's gradient has the parameter's
    strides -- both as it arrives at the parameter (what the Functions returned, summed over a
    shared factor's uses: no copy by AccumulateGrad) and as ``.grad`` (what DDP buckets)."""
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    # Triton kernels take fp16/bf16/fp32 (float64 is refused); the torch backend runs float64
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    model = adapted(method, dtype=dtype).to(device).train()
    params = trainable(model)
    arrived = {}

    def record(name):
        def hook(grad):
            arrived.setdefault(name, grad.stride())

        return hook

    for name, p in params.items():
        p.register_hook(record(name))
    x, labels = images(dtype, batch=2).to(device), torch.tensor([0, 1], device=device)
    with kk.use_backend(backend):
        F.cross_entropy(model(x), labels).backward()
    wrong = {
        name: f"shape {tuple(p.shape)} strides {p.stride()}: arrived {arrived.get(name)}, .grad {p.grad.stride()}"
        for name, p in params.items()
        if arrived.get(name) != p.stride() or p.grad.stride() != p.stride()
    }
    assert not wrong, f"{method} ({backend}): gradients not in their parameter's layout: {wrong}"


# ---------------------------------------------------------------------------- DistributedDataParallel
def _model(case, device="cpu"):
    """The same float64 adapted tiny ViT or Swin in every process (fixed seeds), adapters
    perturbed from their zero-increment init so that every trainable tensor gets a nonzero
    gradient at step 1."""
    backbone, method = case
    config = {"dropout": 0.0} if method in DROPOUT_METHODS else {}
    model = (adapted if backbone == "vit" else swin_adapted)(method, dtype=torch.float64, **config)
    perturb(model, seed=5)
    return model.to(device).train()


def _batch(case, device="cpu"):
    n = WORLD_SIZE * PER_RANK
    x = (images if case[0] == "vit" else swin_images)(torch.float64, seed=11, batch=n)
    return x.to(device), (torch.arange(n) % 5).to(device)


def _train(case, model, forward, shard, device):
    """STEPS SGD steps of the mean cross-entropy on ``_batch(case)[shard]``; returns the step-1
    gradients, the parameters after the last step and the step-1 ``.grad`` layout mismatches."""
    params = trainable(model)
    optimizer = torch.optim.SGD(params.values(), lr=LR)
    x, labels = _batch(case, device)
    record = {}
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x[shard]), labels[shard]).backward()
        if step == 0:
            record["grads"] = {name: p.grad.detach().cpu().clone() for name, p in params.items()}
            record["bad_strides"] = [name for name, p in params.items() if p.grad.stride() != p.stride()]
        optimizer.step()
    record["params"] = {name: p.detach().cpu().clone() for name, p in params.items()}
    return record


def _ddp_case(case, rank, device):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    model = _model(case, device)
    names = {id(p): name for name, p in trainable(model).items()}
    ddp = DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
    reduced = []  # the parameter names in each bucket, in the order DDP all-reduces them

    def counting_allreduce(state, bucket):
        reduced.extend(names[id(p)] for p in bucket.parameters())
        return default_hooks.allreduce_hook(None, bucket)  # DDP's own mean all-reduce, unchanged

    ddp.register_comm_hook(None, counting_allreduce)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = _train(case, model, ddp, shard, device)
    record["reduced"] = reduced
    record["warnings"] = [str(w.message) for w in caught]
    return record


def _ddp_worker(rank, init_method, device_type, out_dir):
    """One rank: every case in turn; the results (or the traceback) go to ``out_dir``."""
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)  # two ranks share the machine's cores
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo", init_method=init_method, rank=rank,
            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            kk.set_backend("torch")
            results = {case: _ddp_case(case, rank, device) for case in DDP_CASES}
        finally:
            dist.destroy_process_group()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)


def _run_ddp(tmp_path, device_type):
    """Spawn WORLD_SIZE ranks (rendezvous through a file in tmp_path: no port to race for),
    bounded by JOIN_TIMEOUT_S; returns each rank's results."""
    context = multiprocessing.get_context("spawn")
    init_method = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        context.Process(target=_ddp_worker, args=(rank, init_method, device_type, str(tmp_path)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    errors = "".join(
        f"\n--- rank {rank}:\n{(tmp_path / f'rank{rank}.err').read_text()}"
        for rank in range(WORLD_SIZE) if (tmp_path / f"rank{rank}.err").exists()
    )
    if hung:
        pytest.fail(f"ranks {hung} still running after {JOIN_TIMEOUT_S} s (a hang in a collective?){errors}")
    failed = {rank: proc.exitcode for rank, proc in enumerate(procs) if proc.exitcode != 0}
    if failed:
        pytest.fail(f"ranks exited with {failed}{errors}")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _check_ddp(ranks):
    for case in DDP_CASES:
        model = _model(case)
        method = "/".join(case)
        # one process, the whole batch: DDP's mean of the per-rank mean losses' gradients is the
        # gradient of the whole batch's mean loss (equal shards)
        with kk.use_backend("torch"):
            want = _train(case, model, model, slice(None), torch.device("cpu"))
        got, other = ranks[0][case], ranks[1][case]
        names = set(want["grads"])
        shared = {name for name in names if name.startswith("kk_shared.")}
        assert bool(shared) == (case[1] != "losa"), f"{method}: shared factors {shared}"
        for rank, result in enumerate(ranks):
            result = result[case]
            assert not [w for w in result["warnings"] if STRIDE_WARNING in w], f"{method} rank {rank}: {result['warnings']}"
            assert not result["bad_strides"], f"{method} rank {rank}: .grad strides differ: {result['bad_strides']}"
            # every trainable tensor, each shared factor included, all-reduced once per step
            assert sorted(result["reduced"]) == sorted(list(names) * STEPS), f"{method} rank {rank}"
        assert got["grads"].keys() == names
        for name, grad in want["grads"].items():
            assert grad.abs().max() > 0, f"{method}: {name} got no gradient in the reference"
            assert_rel_close(got["grads"][name], grad, RTOL[torch.float64], f"{method} grad {name}")
            assert torch.equal(other["grads"][name], got["grads"][name]), f"{method}: ranks' {name}.grad differ"
        for name, param in want["params"].items():
            assert torch.equal(other["params"][name], got["params"][name]), f"{method}: ranks' {name} differ"
            assert_rel_close(got["params"][name], param, RTOL[torch.float64], f"{method} {name} after {STEPS} steps")


def test_ddp_gloo_matches_single_process(tmp_path):
    """Two CPU processes (gloo), every method on ViT and Swin, STEPS steps each: see the module docstring."""
    _check_ddp(_run_ddp(tmp_path, "cpu"))


@pytest.mark.gpu
def test_ddp_nccl_matches_single_process(tmp_path):
    """The same on two GPUs over NCCL (float64, torch backend), against the CPU reference."""
    if torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"needs {WORLD_SIZE} CUDA devices, found {torch.cuda.device_count()}")
    _check_ddp(_run_ddp(tmp_path, "cuda"))
