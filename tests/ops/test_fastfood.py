"""kk.fastfood / kk.fastfood_params against the dense matrix built from (B, Pi, G) and scipy's H."""
import importlib
import math
import struct

import pytest
import scipy.linalg
import torch

import kron_kernels as kk
from conftest import INTERPRET
from kron_kernels.reference.fastfood import fastfood_reference, fwht_butterfly
from utils import RTOL, assert_rel_close, compare_low_precision, compare_with_reference

ff = importlib.import_module("kron_kernels.ops.fastfood")  # the module (kk.ops.fastfood is the function)
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")

# (D, d, mode): tails (Lb not dividing D), Lb dividing D, d = 1, D = 1, d > D (padded), d not a power of two
CASES = [
    (100, 7, "stacked"),
    (1000, 96, "stacked"),
    (256, 64, "stacked"),
    (5, 1, "stacked"),
    (1, 3, "stacked"),
    (200, 200, "padded"),
    (37, 50, "padded"),
]
IDS = [f"D{D}-d{d}-{m}" for D, d, m in CASES]
SEED = 1234


def dense_projection(D, d, seed=SEED, mode="stacked") -> torch.Tensor:
    """P (D, d) in float64 from fastfood_params, scipy's H and explicit permutation matrices."""
    B, Pi, G = kk.fastfood_params(D, d, seed, mode)
    nb, Lb = B.shape
    H = torch.from_numpy(scipy.linalg.hadamard(Lb)).double()
    blocks = []
    for j in range(nb):
        perm = torch.zeros(Lb, Lb, dtype=torch.float64)
        perm[torch.arange(Lb), Pi[j]] = 1.0  # (perm @ x)[k] = x[Pi[k]]
        g = G[j].double()
        M = H @ torch.diag(g) @ perm @ H @ torch.diag(B[j].double())
        blocks.append(M / (math.sqrt(Lb) * g.norm() * math.sqrt(D / Lb)))
    return torch.cat(blocks)[:D, :d]


def rand(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------- generator
def _mix(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def spec_params(seed, j, i, Lb):
    """B_j[i], Pi_j[i], G_j[i] written straight from the docstring of ops/fastfood.py in Python ints."""
    W, M = 0x9E3779B9, 0xFFFFFFFF
    lo, hi = seed & M, seed >> 32
    key = {s: _mix((_mix((lo + s) & M) ^ hi)) for s in (1, 2, 3, 4)}
    bkey = {s: _mix((k + j * W) & M) for s, k in key.items()}
    word = {s: _mix((k + i * W) & M) for s, k in bkey.items()}
    b = 1 - 2 * (word[1] >> 31)
    u1 = ((word[2] >> 8) + 1) * 2.0**-24
    u2 = (word[3] >> 8) * 2.0**-24
    g = math.sqrt(-2 * math.log(u1)) * math.cos(math.pi * (2 * u2 - 1))
    g = struct.unpack("f", struct.pack("f", g))[0]
    n = Lb.bit_length() - 1
    h = n // 2
    x = i ^ (bkey[4] & ((1 << n) - 1))
    for r in range(6):
        k = _mix((bkey[4] + (r + 1) * W) & M)
        hi_bits, lo_bits = x >> h, x & ((1 << h) - 1)
        lo_bits ^= _mix(k ^ hi_bits) & ((1 << h) - 1)
        x = (lo_bits << (n - h)) | hi_bits
    return b, x, g


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_params_follow_documented_generator(seed):
    D, d = 3000, 200  # Lb 256, 12 blocks
    B, Pi, G = kk.fastfood_params(D, d, seed)
    for j, i in [(0, 0), (0, 1), (3, 17), (11, 255), (7, 128)]:
        b, p, g = spec_params(seed, j, i, 256)
        assert B[j, i].item() == b and Pi[j, i].item() == p
        # python's and torch's float64 log/cos may differ in the last bit before the float32 rounding
        assert G[j, i].item() == pytest.approx(g, rel=2e-7)


@pytest.mark.parametrize("log_lb", [0, 1, 2, 3, 5, 8, 11])
def test_params_are_valid(log_lb):
    Lb = 2**log_lb
    B, Pi, G = kk.fastfood_params(3 * Lb + 1, Lb, seed=5)
    assert B.shape == Pi.shape == G.shape == (4, Lb)
    assert B.dtype == G.dtype == torch.float32 and Pi.dtype == torch.int64
    assert torch.equal(B.abs(), torch.ones_like(B))
    assert torch.equal(Pi.sort(dim=1).values, torch.arange(Lb).expand(4, Lb))
    inv = ff._generate(5, Lb, 4, torch.device("cpu"), which=("Pinv",))["Pinv"]
    assert torch.equal(torch.gather(Pi, 1, inv), torch.arange(Lb).expand(4, Lb)), "the inverse network"
    if Lb >= 8:  # a keyed permutation, different per block, almost never the identity
        assert not torch.equal(Pi[0], Pi[1]) and not torch.equal(Pi[0], torch.arange(Lb))


def test_params_statistics():
    """2^19 samples: mean and variance of G within 5 standard errors (SE of the mean 1.4e-3, of
    the variance sqrt(2/n) = 2e-3), B balanced within 5 SE, Pi positions uniform (every
    position of 2^11 permutations of 256 takes each value 8 times in expectation: the
    chi-square statistic of the 256 x 256 table within 5 sigma of its 255^2 degrees of freedom)."""
    B, Pi, G = kk.fastfood_params(2**19, 256, seed=3)
    n = G.numel()
    se = n**-0.5
    assert abs(G.double().mean().item()) < 5 * se
    assert abs(G.double().var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(B.double().mean().item()) < 5 * se
    counts = torch.zeros(256, 256)
    counts.index_put_((torch.arange(256).expand_as(Pi).reshape(-1), Pi.reshape(-1)), torch.ones(Pi.numel()),
                      accumulate=True)
    expected = Pi.shape[0] / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = 255 * 255
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), f"chi-square {chi2:.0f} vs dof {dof}"


def test_params_shapes_by_mode():
    assert kk.fastfood_params(1000, 100)[0].shape == (8, 128)  # stacked: Lb = 2^ceil(log2 d)
    assert kk.fastfood_params(1000, 100, mode="padded")[0].shape == (1, 1024)
    assert kk.fastfood_params(10, 100, mode="padded")[0].shape == (1, 128)


def test_seeds_differ_and_repeat():
    a, b, c = (kk.fastfood_params(500, 64, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])
    hi = kk.fastfood_params(500, 64, seed=1 + 2**32)  # the high word of the seed matters
    assert not torch.equal(a[2], hi[2])


# ----------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("D,d,mode", CASES, ids=IDS)
def test_torch_matches_dense(D, d, mode):
    P = dense_projection(D, d, SEED, mode)
    theta = rand(d).requires_grad_()
    with kk.use_backend("torch"):
        compare_with_reference(lambda t: kk.fastfood(t, D, SEED, mode), lambda t: P @ t, [theta], RTOL[torch.float64])


@pytest.mark.parametrize("D,d,mode", CASES, ids=IDS)
def test_reference_matches_dense(D, d, mode):
    """The papers'-way reference, with the exact transpose as its backward (DESIGN.md 4.8)."""
    P = dense_projection(D, d, SEED, mode)
    params = kk.fastfood_params(D, d, SEED, mode)
    theta = rand(d).requires_grad_()
    compare_with_reference(lambda t: fastfood_reference(t, D, *params), lambda t: P @ t, [theta], RTOL[torch.float64])


def test_reference_butterfly_is_scipy_hadamard():
    x = rand(3, 64)
    assert_rel_close(fwht_butterfly(x), x @ torch.from_numpy(scipy.linalg.hadamard(64)).double(), 1e-12)


@pytest.mark.parametrize("D,d,mode", [(300, 20, "stacked"), (100, 64, "padded")])
def test_gradcheck_torch(D, d, mode):
    theta = rand(d).requires_grad_()
    with kk.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: kk.fastfood(t, D, 3, mode), (theta,))


@pytest.mark.parametrize("D,d,mode", [(256, 64, "stacked"), (1024, 30, "padded"), (2048, 100, "stacked")])
def test_columns_exactly_unit_norm_when_lb_divides_D(D, d, mode):
    """Each full block contributes ||column||^2 = Lb ||G_j||^2 / (||G_j||^2 D) = Lb / D exactly."""
    norms = dense_projection(D, d, 9, mode).norm(dim=0)
    assert torch.allclose(norms, torch.ones(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_column_norms_statistical():
    """D = 1000, d = 64: 15 full blocks give exactly 960/1000 of every squared column norm; the
    40 rows of the cut block add X >= 0 with E[X] = 0.04 (each row's square has expectation
    ||G||^2) and a standard deviation of the mean over the columns below 0.01 (40 rows of
    variance <= 2 ||G||^4, /1000): |mean - 1| < 0.03 is > 3 sigma; a wrong normalisation
    (e.g. without sqrt(D / Lb): 16x) fails by far."""
    sq = dense_projection(1000, 64, 4).norm(dim=0) ** 2
    assert (sq >= 0.96 - 1e-12).all()
    assert abs(sq.mean().item() - 1) < 0.03


def test_linearity_and_transpose_identity():
    D, d = 5000, 77
    t1, t2, g = rand(d, seed=1), rand(d, seed=2), rand(D, seed=3)
    with kk.use_backend("torch"):
        lhs = kk.fastfood(2.5 * t1 - 0.5 * t2, D, 11)
        rhs = 2.5 * kk.fastfood(t1, D, 11) - 0.5 * kk.fastfood(t2, D, 11)
        assert_rel_close(lhs, rhs, 1e-12, "linearity")
        theta = t1.clone().requires_grad_()
        y = kk.fastfood(theta, D, 11)
        (ptg,) = torch.autograd.grad(y, theta, g)
    assert abs(torch.dot(y.detach(), g).item() - torch.dot(t1, ptg).item()) < 1e-10 * y.norm().item() * g.norm().item()


def test_params_path_equals_generated_path():
    D, d = 700, 50
    theta = rand(d)
    params = kk.fastfood_params(D, d, 21)
    with kk.use_backend("torch"):
        assert torch.equal(kk.fastfood(theta, D, 21), kk.fastfood(theta, D, params=params))
        other = kk.fastfood(theta, D, 22)
    assert not torch.allclose(other, kk.fastfood(theta, D, 21))


def test_explicit_params_of_another_code():
    """params= reproduces a projection stored elsewhere (here: B, Pi, G drawn by torch.randn)."""
    D, d = 300, 40
    gen = torch.Generator().manual_seed(0)
    nb, Lb = 5, 64
    B = torch.randint(0, 2, (nb, Lb), generator=gen).double() * 2 - 1
    Pi = torch.stack([torch.randperm(Lb, generator=gen) for _ in range(nb)])
    G = torch.randn(nb, Lb, generator=gen, dtype=torch.float64)
    theta = rand(d).requires_grad_()
    with kk.use_backend("torch"):
        compare_with_reference(lambda t: kk.fastfood(t, D, params=(B, Pi, G)),
                               lambda t: fastfood_reference(t, D, B, Pi, G), [theta], RTOL[torch.float64])


def test_noncontiguous_and_low_precision():
    base = rand(2 * 96)
    theta = base[::2]
    with kk.use_backend("torch"):
        assert_rel_close(kk.fastfood(theta, 400, 1), kk.fastfood(theta.contiguous(), 400, 1), 1e-15)
        params = kk.fastfood_params(400, 96, 1)
        for dtype in (torch.float16, torch.bfloat16):
            compare_low_precision(lambda t: kk.fastfood(t, 400, 1),
                                  lambda t: fastfood_reference(t, 400, *params), [theta.contiguous().requires_grad_()],
                                  dtype)


# ------------------------------------------------------------------------ Triton interpreter
@needs_interpreter
@pytest.mark.parametrize("D,d,mode", CASES, ids=IDS)
def test_triton_matches_dense(D, d, mode):
    """float32 kernels vs the float64 dense P: sums of Lb <= 256 terms, twice (1e-4, utils.RTOL)."""
    P = dense_projection(D, d, SEED, mode)
    theta = rand(d, dtype=torch.float32).requires_grad_()
    with kk.use_backend("triton"):
        compare_with_reference(lambda t: kk.fastfood(t, D, SEED, mode), lambda t: P @ t, [theta],
                               RTOL[torch.float32], ref_dtype=torch.float64)


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 99, 2**63 + 5])
def test_triton_generates_the_same_projection(seed):
    """Same seed, same P on both backends, and the in-kernel generator equals the params= path
    (any difference in B or Pi would change outputs by O(1); G by float32 rounding only)."""
    D, d = 600, 120
    theta = rand(d, dtype=torch.float32)
    g = rand(D, dtype=torch.float32, seed=5)
    params = kk.fastfood_params(D, d, seed)
    with kk.use_backend("torch"):
        want = kk.fastfood(theta.double(), D, seed)
    with kk.use_backend("triton"):
        got = kk.fastfood(theta, D, seed)
        got_params = kk.fastfood(theta, D, params=params)
        t = theta.clone().requires_grad_()
        (grad,) = torch.autograd.grad(kk.fastfood(t, D, seed), t, g)
        t2 = theta.clone().requires_grad_()
        (grad_params,) = torch.autograd.grad(kk.fastfood(t2, D, params=params), t2, g)
    assert_rel_close(got, want, 1e-5, "triton vs torch")
    assert_rel_close(got, got_params, 1e-5, "generated vs params")
    assert_rel_close(grad, grad_params, 1e-5, "P^T g generated vs params")


@needs_interpreter
def test_triton_large_block_falls_back_to_fwht_chain():
    """padded, Lb = 2^14 > 2^13: the vectorised chain with kk.fwht's (multi-pass) Triton kernels."""
    D, d = 10000, 10
    theta = rand(d, dtype=torch.float32)
    with kk.use_backend("torch"):
        want = kk.fastfood(theta.double(), D, 2, "padded")
    with kk.use_backend("triton"):
        got = kk.fastfood(theta, D, 2, "padded")
    assert_rel_close(got, want, 1e-5)


# -------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: kk.fastfood(torch.zeros(4), 0), ValueError, "D must be >= 1"),
        (lambda: kk.fastfood(torch.zeros(0), 10), ValueError, "d must be >= 1"),
        (lambda: kk.fastfood(torch.zeros(4), 10.0), TypeError, "D must be an int"),
        (lambda: kk.fastfood(torch.zeros(2, 4), 10), ValueError, "theta must be 1-D"),
        (lambda: kk.fastfood(torch.zeros(4, dtype=torch.int64), 10), TypeError, "theta must have dtype"),
        (lambda: kk.fastfood([0.0, 1.0], 10), TypeError, "theta must be a torch.Tensor"),
        (lambda: kk.fastfood(torch.zeros(4), 10, mode="dense"), ValueError, "mode must be one of"),
        (lambda: kk.fastfood(torch.zeros(4), 10, seed=-1), ValueError, "seed must be in"),
        (lambda: kk.fastfood(torch.zeros(4), 10, seed=1.5), TypeError, "seed must be an int"),
        (lambda: kk.fastfood(torch.zeros(4), 10, params=kk.fastfood_params(10, 8)), ValueError, r"params B must have shape \(nb, Lb\) = \(3, 4\)"),
        (lambda: kk.fastfood(torch.zeros(4), 10, params=(torch.ones(3, 4), torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4))), ValueError, "params Pi: every row must be a permutation"),
        (lambda: kk.fastfood(torch.zeros(4), 10, params=(torch.ones(3, 4), torch.ones(3, 4), torch.ones(3, 4))), TypeError, "params Pi must have dtype"),
        (lambda: kk.fastfood(torch.zeros(4), 10, params=torch.ones(3, 4)), TypeError, "params must be a tuple"),
        (lambda: kk.fastfood_params(0, 4), ValueError, "D must be >= 1"),
        (lambda: kk.fastfood_params(10, -2), ValueError, "d must be >= 1"),
        (lambda: kk.fastfood_params(10, 4, mode="Stacked"), ValueError, "mode must be one of"),
    ],
    ids=["D0", "d0", "D-float", "theta-2d", "theta-int", "theta-list", "mode", "seed-neg", "seed-float",
         "params-shape", "params-not-perm", "params-pi-dtype", "params-type", "params-D0", "params-d-neg",
         "params-mode"],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cuda_backend_refuses_with_reason():
    with kk.use_backend("cuda"), pytest.raises(kk.BackendUnavailableError, match="no compiled kernel for fastfood"):
        kk.fastfood(torch.zeros(4), 10)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("D,d,mode", [(10**6 + 3, 2**13, "stacked"), (86 * 10**5, 1000, "stacked"),
                                      (300000, 64, "padded")])
def test_gpu_same_projection_as_cpu(D, d, mode):
    theta = rand(d, dtype=torch.float32)
    g = rand(D, dtype=torch.float32, seed=1)
    with kk.use_backend("torch"):
        want = kk.fastfood(theta.double(), D, 17, mode)
        t = theta.double().requires_grad_()
        (want_grad,) = torch.autograd.grad(kk.fastfood(t, D, 17, mode), t, g.double())
    tc = theta.cuda().requires_grad_()
    got = kk.fastfood(tc, D, 17, mode)
    (got_grad,) = torch.autograd.grad(got, tc, g.cuda())
    assert_rel_close(got, want, 1e-5, "P theta on CUDA vs CPU")
    assert_rel_close(got_grad, want_grad, 1e-4, "P^T g on CUDA vs CPU (sums over D / Lb blocks)")


@pytest.mark.gpu
def test_gpu_beyond_int32_offsets():
    """D > 2^31 (8.6 GB of fp32 output): the last block's rows against the CPU chain of that block alone."""
    D, d = 2**31 + 1000, 1024
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 4 * D:
        pytest.skip(f"needs {3 * 4 * D / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB are")
    theta = rand(d, dtype=torch.float32)
    out = kk.fastfood(theta.cuda(), D, 5)
    Lb, nb = ff.fastfood_block_size(D, d)
    j = nb - 1
    p = ff._generate(5, Lb, 1, torch.device("cpu"), first=j)
    x = torch.zeros(1, Lb, dtype=torch.float64)
    x[0, :d] = theta.double()
    x = fwht_butterfly(x * p["B"].double())
    x = torch.gather(x, 1, p["Pi"]) * p["G"].double()
    block = fwht_butterfly(x)[0] / (p["G"].double().norm() * math.sqrt(D))
    rows = D - j * Lb
    assert_rel_close(out[j * Lb:].cpu(), block[:rows], 1e-5, "last block")
    assert not torch.isnan(out).any()
