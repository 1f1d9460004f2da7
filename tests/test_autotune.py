"""Autotuning of the row-tiled forward kernels and the persistent backwards
(``kron_kernels/triton/_autotune.py``): the configuration spaces, their pruning by the device's
shared memory, registers and (backward) partial-sum budget, the tuning log, and -- on a GPU --
that an autotuned launch computes what a fixed-tile launch computes."""
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from kron_kernels.triton import GPUProperties, _autotune, simulate_gpu  # noqa: E402

H100 = GPUProperties("NVIDIA H100 80GB HBM3", (9, 0), 132, 227 * 1024)
SMALL = GPUProperties("a GPU with 48 KiB of shared memory per block", (7, 5), 40, 48 * 1024)


class FakeRows:
    """What the prune reads of the activation argument: its element size and device."""

    def __init__(self, element_size):
        self._size = element_size
        self.device = torch.device("cuda")

    def element_size(self):
        return self._size


def pruned(props, width, element_size):
    prune = _autotune.prune_row_tiles("R_PAD", "x_ptr")
    with simulate_gpu(props):
        return prune(_autotune.row_tile_configs(), {"x_ptr": FakeRows(element_size)}, R_PAD=width)


def tiles(configs):
    return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) for c in configs}


def test_space_has_high_parallelism_and_large_tiles():
    """16- and 32-row tiles with 4 warps (many programs: 12,608 ViT-B tokens / 16 = 788 on 132
    SMs) beside the 64- and 128-row tiles that amortise the factor loads."""
    space = tiles(_autotune.row_tile_configs())
    assert len(space) == len(_autotune.ROW_TILES)
    assert {n for n, *_ in space} == {16, 32, 64, 128}
    assert any(s == 1 for *_, s in space)  # an unpipelined tile for small shared memories
    assert any(n == 16 and w == 4 for n, _, w, _ in space)


def test_h100_keeps_every_tile_at_vit_widths():
    """At ViT factor widths (R_PAD 16-64) every tile fits an H100 in bf16."""
    assert tiles(pruned(H100, 32, 2)) == set(_autotune.ROW_TILES)


@pytest.mark.parametrize("width", [16, 64, 128, 256])
@pytest.mark.parametrize("element_size", [2, 4])
def test_pruning_respects_shared_memory_and_registers(width, element_size):
    """What survives fits the device's shared memory with its pipeline stages and keeps at most
    MAX_VALUES_PER_THREAD live fp32 values per thread, on an H100 and on a small GPU."""
    for props in (H100, SMALL):
        kept = pruned(props, width, element_size)
        assert kept
        for config in kept:
            smem, values = _autotune._resources(config, width, element_size)
            assert smem <= props.shared_memory_per_block_optin
            assert values <= _autotune.MAX_VALUES_PER_THREAD
    if width <= 128:  # the ranks the methods use (LoSA's r = 64, ARC's 50: R_PAD 64) keep a choice
        assert len(pruned(H100, width, element_size)) > 1


def test_wide_factors_and_small_gpus_lose_tiles():
    """The wide factors of LoSA's larger ranks (R_PAD 256) lose the 128-row tiles; a GPU with
    48 KiB per block loses the deep pipelines an H100 keeps."""
    wide = tiles(pruned(H100, 256, 4))
    assert wide and all(n < 128 for n, *_ in wide)
    assert len(pruned(SMALL, 128, 4)) < len(pruned(H100, 128, 4))


def test_pruning_never_empty():
    """A width no tile fits still gets one configuration (the one with the fewest live values)."""
    kept = pruned(SMALL, 4096, 4)
    assert len(kept) == 1


def test_n_bucket():
    assert [_autotune.n_bucket(n) for n in (1, 16, 17, 12608, 197 * 64)] == [16, 16, 32, 16384, 16384]


RECORD = """
import sys, torch
import kron_kernels as kk
from kron_kernels.triton import GPUProperties, targets
props = GPUProperties("sim", (int(sys.argv[1]), 0), 40, int(sys.argv[2]))
with targets.record_launches(props) as recording:
    h = torch.empty(64, 256, device="cuda")
    kk.bottleneck_adapter(h, torch.empty(200, 256, device="cuda"), None, torch.empty(256, 200, device="cuda"), None)
print(sum(launch.name == "_bottleneck_fwd_kernel" for launch in recording.launches))
"""


def test_recording_compiles_what_the_pruning_keeps(tmp_path):
    """The GPU-target check records one forward launch per configuration the pruning keeps on
    the simulated device (not the whole space), so what it compiles is what the autotuner may
    run there: fewer on a small GPU at a wide factor (k = 200: R_PAD 256). In a subprocess:
    this process interprets its kernels."""
    from test_gpu_targets import _run

    script = tmp_path / "record.py"
    script.write_text(RECORD)
    for props in (H100, SMALL):
        proc = _run([str(script), str(props.capability[0]), str(props.shared_memory_per_block_optin)], None)
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout.split()[-1]) == len(pruned(props, 256, 4)), props.name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autotuned_forward_equals_fixed_tiles(dtype):
    """On a GPU the autotuned bottleneck forward (the Compacter adapter's instance) gives the
    fixed-tile launch's result (bitwise up to the tile's summation order: the k-dim reduction is
    split differently, so within fp32 rounding of the projection), and the tuning is logged
    with its time."""
    from kron_kernels.triton import bottleneck as triton_bottleneck

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 768, device="cuda", generator=gen).to(dtype)
    w_down = torch.randn(24, 768, device="cuda", generator=gen) * 0.05
    w_up = torch.randn(768, 24, device="cuda", generator=gen) * 0.05
    one = torch.ones((), device="cuda")

    def forward(**tiles):
        return triton_bottleneck.bottleneck_forward(
            h, None, w_down.t(), w_up.t(), None, None, one, None, mode="channel", middle="gelu", residual=True,
            p_drop=0.0, seed=None, data_dtype=dtype, **tiles)

    before = len(_autotune.tunings())
    tuned = forward()
    fixed = forward(block_n=32, block_d=64)
    log = _autotune.tunings()[before:]
    assert len(log) == 1 and log[0].kernel == "_bottleneck_fwd_kernel" and log[0].seconds > 0
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5  # one bf16 rounding of the output; fp32 sums
    assert (tuned.float() - fixed.float()).abs().max() <= tol * fixed.float().abs().max()
    assert triton.cdiv(3000, 16) > 132  # the space offers more programs than SMs


def test_report_lists_the_tunings():
    """The benchmark report prints every tuning with its first-call time (never hidden)."""
    from benchmarks import report

    tunings = [_autotune.Tuning("_fact_fwd_kernel", (768, 3, 16, 16384, True, "torch.bfloat16"),
                                "BLOCK_N: 16, BLOCK_D: 64, num_warps: 4", 4.25)]
    text = report.autotuning_markdown(tunings, {"device": "NVIDIA H200"})
    assert "_fact_fwd_kernel" in text and "4.25" in text and "1 tunings, 4.2 s" in text
    from kron_kernels import triton as kk_triton

    assert kk_triton.tunings() == _autotune.tunings()


# ----------------------------------------------------------------------------------------
# the persistent backwards: tile and programs per SM, bounded by the partial-sum budget
# ----------------------------------------------------------------------------------------
def pruned_backward(props, width, element_size, d, partial_bytes=None):
    from kron_kernels.triton import bottleneck as tb

    prune = _autotune.prune_backward_tiles("R_PAD", "x_ptr", partial_bytes or tb._bottleneck_partial_bytes)
    with simulate_gpu(props):
        return prune(_autotune.backward_tile_configs(), {"x_ptr": FakeRows(element_size), "D": d, "K": 3},
                     R_PAD=width)


def test_backward_programs_bounded_by_the_partial_budget():
    """FacT's narrow factors (R_PAD 16) keep every tile, four programs per SM included; ARC's and
    LoSA's R_PAD 64 slices keep one program per SM at ViT-B width (the budget); whatever is
    kept fits the budget, and something is always kept."""
    from kron_kernels.triton import bottleneck as tb

    fact = pruned_backward(H100, 16, 2, 768, tb._fact_partial_bytes)
    assert {c.kwargs["PROGRAMS_PER_SM"] for c in fact} == {1, 2, 4}
    assert len(fact) == len(_autotune.BACKWARD_TILES)
    arc = pruned_backward(H100, 64, 2, 768)
    assert arc and {c.kwargs["PROGRAMS_PER_SM"] for c in arc} == {1}
    for width, d in ((16, 768), (32, 768), (64, 768), (64, 1024), (128, 1024)):
        per_program = tb._bottleneck_partial_bytes({"R_PAD": width, "D": d})
        cap = _autotune.max_programs_per_sm(H100.multi_processor_count, per_program)
        kept = pruned_backward(H100, width, 2, d)
        assert kept, (width, d)
        assert all(c.kwargs["PROGRAMS_PER_SM"] <= cap for c in kept)
        assert cap == 1 or H100.multi_processor_count * cap * per_program <= _autotune.PARTIAL_BUDGET_BYTES
    # no tile fits: the one with the fewest live values (a 64-row tile failed to compile there)
    assert [c.kwargs["BLOCK_N"] for c in pruned_backward(SMALL, 4096, 4, 768)] == [32]
    wide = pruned_backward(GPUProperties("A100", (8, 0), 108, 163 * 1024), 128, 2, 768)
    assert all(c.kwargs["BLOCK_N"] <= 32 for c in wide)


RECORD_BACKWARD = """
import sys, torch
import kron_kernels as kk
from kron_kernels.triton import GPUProperties, targets
props = GPUProperties("sim", (9, 0), 132, 227 * 1024)
with targets.record_launches(props) as recording:
    x = torch.empty(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    U = torch.empty(768, 8, device="cuda", requires_grad=True)
    V = torch.empty(768, 8, device="cuda", requires_grad=True)
    cores = torch.empty(3, 8, 8, device="cuda", requires_grad=True)
    targets._fwd_bwd(lambda: kk.fact_apply(x, U, V, cores, 0.5, split="rows"))()
print(sum(launch.name == "_fact_bwd_kernel" for launch in recording.launches))
"""


def test_recording_compiles_every_backward_tile(tmp_path):
    """The GPU-target check records one backward launch per configuration the pruning keeps
    (FacT at ViT-B width: all of them), so every tile the autotuner may run is compiled; the
    launcher reads the chosen program count back from the autotuner (set by the recording as
    by a tuned call). In a subprocess: this process interprets its kernels."""
    from test_gpu_targets import _run

    script = tmp_path / "record.py"
    script.write_text(RECORD_BACKWARD)
    proc = _run([str(script)], None)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == len(_autotune.BACKWARD_TILES)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["fact", "arc"])
def test_autotuned_backward_equals_fixed_tiles(op):
    """On a GPU the autotuned persistent backward gives the fixed tile's gradients (up to the
    order of the row-block sums: within fp32 rounding), and its tuning is logged."""
    from kron_kernels.triton import bottleneck as tb

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, r = 12608, 768, 8 if op == "fact" else 50
    x = torch.randn(n, d, device="cuda", generator=gen).bfloat16()
    before = len(_autotune.tunings())
    if op == "fact":
        U, V = (torch.randn(d, r, device="cuda", generator=gen) * d**-0.5 for _ in range(2))
        cores = torch.randn(3, r, r, device="cuda", generator=gen)
        dout = torch.randn(n, 3 * d, device="cuda", generator=gen).bfloat16()

        def backward(**tiles):
            g = tb.fact_backward(dout, x, None, U, V, cores, split="rows", scale=0.5, p_drop=0.1, seed=3,
                                 need_dx=True, need_dw=True, **tiles)
            return [g["dx"], g["dU"], g["dV"], g["dcores"]]
    else:
        U = torch.randn(d, r, device="cuda", generator=gen) * d**-0.5
        lam, one = torch.randn(r, device="cuda", generator=gen), torch.ones((), device="cuda")
        dout = torch.randn(n, d, device="cuda", generator=gen).bfloat16()

        def backward(**tiles):
            g = tb.bottleneck_backward(dout, x, None, U, None, None, lam, one, mode="channel", middle="diag",
                                       residual=True, p_drop=0.1, seed=3, data_dtype=torch.bfloat16, need_dx=True,
                                       need_dx2=False, need_dw=True, **tiles)
            return [g["dx"], g["ddown"], g["ddiag"]]

    tuned = backward()
    log = _autotune.tunings()[before:]
    assert len(log) == 1 and log[0].kernel.endswith("_bwd_kernel") and log[0].seconds > 0
    fixed = backward(num_programs=132)
    for name, t, f in zip(["dx", "dU/dD", "dV/ddiag", "dcores"], tuned, fixed):
        tol = 2 ** -7 if t.dtype == torch.bfloat16 else 1e-5  # one bf16 rounding; fp32 sums in another order
        assert (t.float() - f.float()).abs().max() <= tol * f.float().abs().max(), name


# ----------------------------------------------------------------------------------------
# the fwht row pass (kron_kernels/triton/fwht.py): tiles of 2^11..2^13 elements, 4 or 8 warps
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_a", range(8, 14))
@pytest.mark.parametrize("n_vectors", [1, 3, 32768])
def test_fwht_tiles_hold_a_row_and_no_more_rows_than_there_are(log_a, n_vectors):
    from kron_kernels.triton import fwht as triton_fwht

    a = 1 << log_a
    configs = triton_fwht._tile_configs()
    kept = triton_fwht._prune_tiles(configs, {"n_vectors": n_vectors, "A": a})
    assert kept, "never nothing"
    fits = [c for c in configs if a <= c.kwargs["TILE"] and c.kwargs["TILE"] // a <= triton.next_power_of_2(n_vectors)]
    if not fits:  # fewer rows than the smallest tile holds: that tile, its rows masked
        assert [c.kwargs["TILE"] for c in kept] == [min(t for t in triton_fwht.TILES if t >= a)]
    for config in kept if fits else ():
        tile = config.kwargs["TILE"]
        assert tile >= a and tile % a == 0, "a program holds whole rows"
        assert tile // a == 1 or tile // a <= triton.next_power_of_2(n_vectors), "no program wider than the work"
    if n_vectors == 32768:  # every tile that holds a row, with both warp counts
        assert {(c.kwargs["TILE"], c.num_warps) for c in kept} == {
            (t, w) for t in triton_fwht.TILES for w in triton_fwht.WARPS if t >= a}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fwht_autotuned_row_pass_equals_the_fixed_tile(dtype, monkeypatch):
    """The butterfly's order does not depend on the tile: the autotuned row pass is bit for bit
    the fixed tile's, and the tuning is logged."""
    from kron_kernels.triton import fwht as triton_fwht

    x = torch.randn(3000, 1024, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)).to(dtype)
    tuned = triton_fwht.fwht_forward(x, 0.5)
    assert triton_fwht._fwht_autotuned.cache, "the row pass went through the autotuner"
    assert any(t.kernel == "_fwht_kernel" for t in _autotune.tunings()), "and its tuning is logged"
    monkeypatch.setattr(triton_fwht, "AUTOTUNE_MIN_LOG", 99)
    assert torch.equal(tuned, triton_fwht.fwht_forward(x, 0.5))
