"""kk.fastfood / kk.fastfood_params against the dense matrix built from (B, Pi, G) and scipy's H."""
import importlib
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import scipy.linalg
import torch

import kron_kernels as kk
from kron_kernels import _build, backend
from kron_kernels.reference.fastfood import fastfood_reference, fwht_butterfly
from utils import (
    RTOL, TRITON_DEVICES, assert_rel_close, compare_low_precision, compare_with_reference, needs_interpreter,
    outputs_and_grads,
)

ff = importlib.import_module("kron_kernels.ops.fastfood")  # the module (kk.ops.fastfood is the function)
EXTENSION_OK, EXTENSION_REASON = backend.extension_status()
if EXTENSION_OK and "fastfood" not in backend.extension().kernels():
    EXTENSION_OK, EXTENSION_REASON = False, "the installed kron_kernels._C predates the Fastfood kernels: rebuild it"
needs_extension = pytest.mark.skipif(not EXTENSION_OK,
                                     reason=f"the compiled extension is not built here: {EXTENSION_REASON}")

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
GENERATORS = (1, 2)  # the generator versions (ops/fastfood.py's docstring)


def dense_projection(D, d, seed=SEED, mode="stacked", generator=1) -> torch.Tensor:
    """P (D, d) in float64 from fastfood_params, scipy's H and explicit permutation matrices."""
    B, Pi, G = kk.fastfood_params(D, d, seed, mode, generator=generator)
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


def rand(*shape, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------- generator
def _mix(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def spec_params(seed, j, i, Lb, generator=1):
    """B_j[i], Pi_j[i], G_j[i] written straight from the docstring of ops/fastfood.py in Python ints
    (generator 1 or 2)."""
    W, M = 0x9E3779B9, 0xFFFFFFFF
    lo, hi = seed & M, seed >> 32
    key = {s: _mix((_mix((lo + s) & M) ^ hi)) for s in (1, 2, 3, 4)}
    bkey = {s: _mix((k + j * W) & M) for s, k in key.items()}

    def word(s, counter):
        return _mix((bkey[s] + counter * W) & M)

    if generator == 1:
        b = 1 - 2 * (word(1, i) >> 31)
        counter, trig = i, math.cos
    else:  # bit i mod 32 of word i // 32; the pair i // 2, cos for even i, sin for odd i
        b = 1 - 2 * ((word(1, i >> 5) >> (i & 31)) & 1)
        counter, trig = i >> 1, (math.sin if i & 1 else math.cos)
    u1 = ((word(2, counter) >> 8) + 1) * 2.0**-24
    u2 = (word(3, counter) >> 8) * 2.0**-24
    g = math.sqrt(-2 * math.log(u1)) * trig(math.pi * (2 * u2 - 1))
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


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_params_follow_documented_generator(seed, generator):
    D, d = 3000, 200  # Lb 256, 12 blocks
    B, Pi, G = kk.fastfood_params(D, d, seed, generator=generator)
    # (5, 31), (5, 32): either side of a B word of generator 2; (3, 16), (3, 17): one Box-Muller pair
    for j, i in [(0, 0), (0, 1), (3, 16), (3, 17), (11, 255), (7, 128), (5, 31), (5, 32)]:
        b, p, g = spec_params(seed, j, i, 256, generator)
        assert B[j, i].item() == b and Pi[j, i].item() == p
        # python's and torch's float64 log/cos/sin may differ in the last bit before the float32 rounding
        assert G[j, i].item() == pytest.approx(g, rel=2e-7)


# (j, i) -> (B_j[i], Pi_j[i], G_j[i]) for seed 2^40 + 3, Lb = 256 (D = 3000, d = 200), computed once
# from the docstring's definition (spec_params): the generators cannot drift unnoticed. Version 1
# is the projection every earlier release generated; version 2 shares its Pi and, at even i, its
# formula for G at counter i / 2 (G_0[0] is the same).
PINNED = {
    1: {(0, 0): (-1, 93, 0.21444901823997498), (0, 1): (-1, 94, 1.640674352645874),
        (3, 17): (-1, 232, -0.053616832941770554), (11, 255): (1, 93, -0.019352471455931664),
        (7, 128): (1, 53, 0.5209500193595886), (5, 63): (1, 230, -1.1977657079696655),
        (5, 64): (-1, 139, -1.029650092124939)},
    2: {(0, 0): (1, 93, 0.21444901823997498), (0, 1): (-1, 94, 0.6585455536842346),
        (3, 17): (1, 232, 0.542009174823761), (11, 255): (1, 93, 1.4432014226913452),
        (7, 128): (1, 53, 0.901984453201294), (5, 63): (-1, 230, -0.9668982028961182),
        (5, 64): (-1, 139, 0.6614879369735718)},
}


@pytest.mark.parametrize("generator", GENERATORS)
def test_params_pinned_values(generator):
    B, Pi, G = kk.fastfood_params(3000, 200, 2**40 + 3, generator=generator)
    for (j, i), (b, p, g) in PINNED[generator].items():
        assert (B[j, i].item(), Pi[j, i].item()) == (b, p), (j, i)
        assert G[j, i].item() == pytest.approx(g, rel=2e-7), (j, i)  # float64 libm, one float32 rounding
        assert spec_params(2**40 + 3, j, i, 256, generator) == (b, p, pytest.approx(g, rel=2e-7))
    assert kk.fastfood_params(3000, 200, 2**40 + 3)[0].equal(B) == (generator == 1), "the default is version 1"


def test_generator_2_pairs_and_words():
    """Version 2's structure read from fastfood_params and the words alone: G at an even i is
    version 1's G at i / 2 (the cosine of the same words); a pair (cos, sin) has the pair's
    radius, G[2 i2]^2 + G[2 i2 + 1]^2 = -2 ln u1 of counter i2 (two cosines, or a sign lost, would
    not); Pi is version 1's, B another; a block of one keeps the cosine."""
    (B1, Pi1, G1), (B2, Pi2, G2) = (kk.fastfood_params(4096, 1024, 9, generator=g) for g in GENERATORS)
    assert torch.equal(Pi1, Pi2) and not torch.equal(B1, B2)
    # float64 log/cos on tensors of other lengths (vectorised vs scalar tails) may differ in the last
    # bit before the float32 rounding
    assert torch.allclose(G2[:, 0::2], G1[:, :512], rtol=2e-7, atol=0), "even elements: version 1's formula at i / 2"
    keys = ff._block_keys(ff.stream_keys(9)[1], 4, torch.device("cpu"))
    u1 = ((ff._words(keys, 512) >> 8) + 1).double() * 2.0**-24
    assert_rel_close(G2[:, 0::2].double() ** 2 + G2[:, 1::2].double() ** 2, -2 * torch.log(u1), 1e-6, "R^2")
    odd = torch.sin(math.pi * (2 * (ff._words(ff._block_keys(ff.stream_keys(9)[2], 4, torch.device("cpu")), 512)
                                    >> 8).double() * 2.0**-24 - 1))
    assert torch.equal(torch.sign(G2[:, 1::2].double()), torch.sign(odd)), "odd elements: the sine's sign"
    one = kk.fastfood_params(3, 1, 4, generator=2)[2]  # Lb = 1: the cosine alone
    assert one.shape == (3, 1) and torch.equal(one, kk.fastfood_params(3, 1, 4, generator=1)[2])


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("log_lb", [0, 1, 2, 3, 5, 8, 11])
def test_params_are_valid(log_lb, generator):
    Lb = 2**log_lb
    B, Pi, G = kk.fastfood_params(3 * Lb + 1, Lb, seed=5, generator=generator)
    assert B.shape == Pi.shape == G.shape == (4, Lb)
    assert B.dtype == G.dtype == torch.float32 and Pi.dtype == torch.int64
    assert torch.equal(B.abs(), torch.ones_like(B))
    assert torch.equal(Pi.sort(dim=1).values, torch.arange(Lb).expand(4, Lb))
    inv = ff._generate(5, Lb, 4, torch.device("cpu"), which=("Pinv",))["Pinv"]
    assert torch.equal(torch.gather(Pi, 1, inv), torch.arange(Lb).expand(4, Lb)), "the inverse network"
    if Lb >= 8:  # a keyed permutation, different per block, almost never the identity
        assert not torch.equal(Pi[0], Pi[1]) and not torch.equal(Pi[0], torch.arange(Lb))


# where the tensor generator (fastfood_params: the torch path's B, Pi, G, also on CUDA for blocks
# beyond the kernels') runs
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("device", DEVICES)
def test_params_statistics(device, generator):
    """2^19 samples: mean and variance of G within 5 standard errors (SE of the mean 1.4e-3, of
    the variance sqrt(2/n) = 2e-3), B balanced within 5 SE, Pi positions uniform (every
    position of 2^11 permutations of 256 takes each value 8 times in expectation: the
    chi-square statistic of the 256 x 256 table within 5 sigma of its 255^2 degrees of freedom);
    on CUDA the same tensors as on the CPU (integer B and Pi exactly). Version 2: the same
    checks, and the pairs' cos and sin uncorrelated (the mean of G[2 i2] G[2 i2 + 1] within 5 SE
    of 0: E = 0, Var = 1 for independent N(0, 1); 2^18 pairs), as are the 32 bits of a B word
    (neighbours' product mean within 5 SE)."""
    B, Pi, G = (t.cpu() for t in kk.fastfood_params(2**19, 256, seed=3, device=device, generator=generator))
    if device != "cpu":
        want = kk.fastfood_params(2**19, 256, seed=3, generator=generator)
        assert torch.equal(B, want[0]) and torch.equal(Pi, want[1])
        assert_rel_close(G, want[2], 1e-6, "G (float64 transcendentals on CUDA vs CPU, one rounding)")
    n = G.numel()
    se = n**-0.5
    assert abs(G.double().mean().item()) < 5 * se
    assert abs(G.double().var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(B.double().mean().item()) < 5 * se
    pairs = G.double().view(-1, 2)
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item()) < 5 * math.sqrt(2 / n), "cos and sin of a pair"
    assert abs((pairs[:, 0] ** 2).mean().item() - 1) < 5 * math.sqrt(4 / n), "even elements alone"
    b = B.double().view(-1)
    assert abs((b[1:] * b[:-1]).mean().item()) < 5 * se, "neighbouring signs"
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


# (implementation, device) of the statistical checks of the projection the kernels generate: the
# torch path (float64) and the C++ kernel on the CPU; on a GPU the CUDA kernel and the Triton one
PROJECTION_BACKENDS = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cuda", "cpu", id="extension-cpu", marks=needs_extension),
    pytest.param("cuda", "cuda", id="extension-cuda", marks=[pytest.mark.gpu, needs_extension]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
]


def kernel_projection(D, d, seed, impl, device, generator=1) -> torch.Tensor:
    """P (D, d) in float64 on the CPU, column i = kk.fastfood(e_i) on ``impl`` and ``device`` (float64
    on the torch path, float32 on the kernels)."""
    eye = torch.eye(d, dtype=torch.float64 if impl == "torch" else torch.float32, device=device)
    with kk.use_backend(impl):
        return torch.stack([kk.fastfood(eye[i], D, seed, generator=generator) for i in range(d)], 1).double().cpu()


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("impl, device", PROJECTION_BACKENDS)
def test_column_norms_statistical(impl, device, generator):
    """D = 1000, d = 64: 15 full blocks give exactly 960/1000 of every squared column norm; the
    40 rows of the cut block add X >= 0 with E[X] = 0.04 (each row's square has expectation
    ||G||^2) and a standard deviation of the mean over the columns below 0.01 (40 rows of
    variance <= 2 ||G||^4, /1000): |mean - 1| < 0.03 is > 3 sigma; a wrong normalisation
    (e.g. without sqrt(D / Lb): 16x) fails by far. The projection as each implementation
    generates it on its device (fp32 kernels: 1e-5)."""
    sq = kernel_projection(1000, 64, 4, impl, device, generator).norm(dim=0) ** 2
    assert (sq >= 0.96 - 1e-5).all()
    assert abs(sq.mean().item() - 1) < 0.03


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("impl, device", PROJECTION_BACKENDS)
def test_projection_statistics(impl, device, generator):
    """The projection as each implementation generates it on its device, D = 2^16, d = Lb = 64
    (1024 full blocks):

    * column norms exactly 1 (Lb divides D);
    * columns orthogonal on average: an inner product of columns i != i' is, per block,
      (Lb / D) B_i B_i' sum_k s_k w_k with w = G^2 / ||G||^2 (Dirichlet(1/2, ..., 1/2)) and s a
      balanced +-1 pattern (h_{i xor i'} through Pi): mean 0, and D E[<p_i, p_i'>^2] = Lb Var(s.w)
      = 1.94 at Lb = 64 (2 for large Lb; a Gaussian matrix gives 1). Over the 2016 pairs:
      |mean| sqrt(D) < 5 sqrt(2 / 2016) and D mean(<p_i, p_i'>^2) in [1.5, 2.4] (20 seeds on the
      CPU: 1.82 ... 2.05). Blocks that repeat (a block counter ignored by the hash) add
      coherently: D <p, p'>^2 grows with the number of blocks and fails by far;
    * G's Gaussian moments: column 0 transformed back, H p_0 sqrt(D) / Lb = B_j[0] G_j / ||G_j||
      per block, scaled by sqrt(Lb): x with mean square 1 per block, E x^4 = 3 Lb / (Lb + 2),
      E x^6 = 15 Lb^2 / ((Lb + 2)(Lb + 4)), odd moments 0; 65536 samples, 5 standard errors
      (SE sqrt(E x^2k / n): 3.9e-3, 1.5e-2 for x^3, 3.8e-2 for x^4 (sqrt(96 / n)), 0.39 for x^6)."""
    D, d = 2**16, 64
    n = D
    P = kernel_projection(D, d, 2024, impl, device, generator)
    gram = P.t() @ P
    assert_rel_close(gram.diagonal(), torch.ones(d, dtype=torch.float64), 1e-5, "column norms")
    off = gram[~torch.eye(d, dtype=torch.bool)]
    pairs = off.numel() // 2
    assert abs(off.mean().item()) * math.sqrt(D) < 5 * math.sqrt(2 / pairs), "columns orthogonal on average"
    assert 1.5 < D * (off**2).mean().item() < 2.4, "inner products of columns ~ N(0, 1.94 / D)"
    Lb = d
    x = (fwht_butterfly(P[:, 0].view(-1, Lb)) * math.sqrt(D) / Lb * math.sqrt(Lb)).reshape(-1)
    assert abs((x**2).mean().item() - 1) < 1e-5
    moments = {1: 0.0, 3: 0.0, 4: 3 * Lb / (Lb + 2), 6: 15 * Lb**2 / ((Lb + 2) * (Lb + 4))}
    se = {1: 1.0, 3: math.sqrt(15), 4: math.sqrt(96), 6: math.sqrt(10170)}
    for k, want in moments.items():
        got = (x**k).mean().item()
        assert abs(got - want) < 5 * se[k] / math.sqrt(n), f"E x^{k} = {got:.4f}, expected {want:.4f}"


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


def dense_naive(P):
    """The naive low-precision P theta for the DESIGN.md 6 rule: the dense product with P stored
    in theta's dtype (one rounding of P, fp32 accumulation, one of the result). The butterfly
    chain of reference/fastfood.py in bf16 rounds after each of its 2 log2(Lb) stages, an RMS
    error of ~2.1 u (u = 2^-8, the unit roundoff) against ~0.6 u for the dense product: twice
    the chain's would let a 1.6% error pass."""
    return lambda t: P.to(t.dtype) @ t


def test_noncontiguous_and_low_precision():
    base = rand(2 * 96)
    theta = base[::2]
    with kk.use_backend("torch"):
        assert_rel_close(kk.fastfood(theta, 400, 1), kk.fastfood(theta.contiguous(), 400, 1), 1e-15)
        P = dense_projection(400, 96, 1)
        for dtype in (torch.float16, torch.bfloat16):
            compare_low_precision(lambda t: kk.fastfood(t, 400, 1), dense_naive(P),
                                  [theta.contiguous().requires_grad_()], dtype)


# ------------------------------------------- Triton (interpreter on CPU tensors, or CUDA)
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("D,d,mode", CASES, ids=IDS)
def test_triton_matches_dense(D, d, mode, device):
    """float32 kernels vs the float64 dense P: sums of Lb <= 256 terms, twice (1e-4, utils.RTOL)."""
    P = dense_projection(D, d, SEED, mode).to(device)
    theta = rand(d, dtype=torch.float32, device=device).requires_grad_()
    with kk.use_backend("triton"):
        compare_with_reference(lambda t: kk.fastfood(t, D, SEED, mode), lambda t: P @ t, [theta],
                               RTOL[torch.float32], ref_dtype=torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("seed, generator", [(0, 1), (99, 1), (2**63 + 5, 1), (0, 2), (2**63 + 5, 2)])
def test_triton_generates_the_same_projection(seed, generator, device):
    """The in-kernel generator and the params= path both compute P theta and P^T g for the
    float64 dense P of fastfood_params (column by column: scipy's H, explicit permutation
    matrices), so the kernels generate the documented projection and transpose it exactly
    (any difference in B or Pi, or a row of g dropped, changes the result by O(1/sqrt(D)) or
    more; G differs by float32 rounding only, the kernels' sums of Lb = 128 terms ~1e-6)."""
    D, d = 600, 120  # Lb = 128: four full blocks and a cut one (88 of 128 rows)
    theta = rand(d, dtype=torch.float32, device=device)
    g = rand(D, dtype=torch.float32, seed=5, device=device)
    params = tuple(t.to(device) for t in kk.fastfood_params(D, d, seed, generator=generator))
    P = dense_projection(D, d, seed, generator=generator).to(device)
    want, want_grad = P @ theta.double(), P.t() @ g.double()
    with kk.use_backend("triton"):
        got = kk.fastfood(theta, D, seed, generator=generator)
        got_params = kk.fastfood(theta, D, params=params)
        t = theta.clone().requires_grad_()
        (grad,) = torch.autograd.grad(kk.fastfood(t, D, seed, generator=generator), t, g)
        t2 = theta.clone().requires_grad_()
        (grad_params,) = torch.autograd.grad(kk.fastfood(t2, D, params=params), t2, g)
    assert_rel_close(got, want, 1e-5, "P theta generated vs dense P")
    assert_rel_close(got_params, want, 1e-5, "P theta params= vs dense P")
    assert_rel_close(grad, want_grad, 1e-5, "P^T g generated vs dense P^T g")
    assert_rel_close(grad_params, want_grad, 1e-5, "P^T g params= vs dense P^T g")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_large_block_falls_back_to_fwht_chain(device):
    """padded, Lb = 2^14 > 2^13: the vectorised chain with kk.fwht's (multi-pass) Triton kernels,
    output and P^T g against the float64 papers'-way reference (reference/fastfood.py, itself
    checked against the dense P above) on the same (B, Pi, G)."""
    D, d = 10000, 10
    params = tuple(t.to(device) for t in kk.fastfood_params(D, d, 2, "padded"))
    theta = rand(d, dtype=torch.float32, device=device).requires_grad_()
    with kk.use_backend("triton"):
        compare_with_reference(lambda t: kk.fastfood(t, D, 2, "padded"), lambda t: fastfood_reference(t, D, *params),
                               [theta], 1e-5, ref_dtype=torch.float64)


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
        (lambda: kk.fastfood(torch.zeros(4), 10, generator=3), ValueError, r"generator must be one of \(1, 2\), got 3"),
        (lambda: kk.fastfood(torch.zeros(4), 10, generator=0), ValueError, "generator must be one of"),
        (lambda: kk.fastfood(torch.zeros(4), 10, generator=2.0), TypeError, "generator must be one of"),
        (lambda: kk.fastfood(torch.zeros(4), 10, generator=True), TypeError, "generator must be one of"),
        (lambda: kk.fastfood(torch.zeros(4), 10, generator="2"), TypeError, "generator must be one of"),
        (lambda: kk.fastfood(torch.zeros(4), 10, generator=None), TypeError, "generator must be one of"),
        (lambda: kk.fastfood(torch.zeros(4), 10, params=kk.fastfood_params(10, 4), generator=5), ValueError,
         "generator must be one of"),
        (lambda: kk.fastfood_params(10, 4, generator=-1), ValueError, "generator must be one of"),
        (lambda: kk.fastfood_params(10, 4, generator=1.5), TypeError, "generator must be one of"),
    ],
    ids=["D0", "d0", "D-float", "theta-2d", "theta-int", "theta-list", "mode", "seed-neg", "seed-float",
         "params-shape", "params-not-perm", "params-pi-dtype", "params-type", "params-D0", "params-d-neg",
         "params-mode", "generator-3", "generator-0", "generator-float", "generator-bool", "generator-str",
         "generator-none", "generator-with-params", "params-generator-neg", "params-generator-float"],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "theta,params,match",
    [
        (torch.zeros(4), kk.fastfood_params(10, 4), "explicit params take the Triton/torch paths"),
        (torch.zeros(4, dtype=torch.float64), None, "compute in float32, got float64"),
    ],
    ids=["params", "fp64"],
)
def test_cuda_backend_refuses_with_reason(theta, params, match):
    with kk.use_backend("cuda"), pytest.raises(kk.BackendUnavailableError, match=match):
        kk.fastfood(theta, 10, params=params)


def test_cuda_backend_without_extension_says_why(monkeypatch):
    monkeypatch.setattr(backend, "extension_status", lambda: (False, "not built (test)"))
    monkeypatch.setattr(ff, "_extension_devices", lambda: frozenset({"cuda", "cpu"}))
    with kk.use_backend("cuda"), pytest.raises(kk.BackendUnavailableError, match=r"not built \(test\)"):
        kk.fastfood(torch.zeros(4), 10)


# ------------------------------------------------------------------- compiled CPU kernel (_C)
SEEDS = [0, 99, 2**40 + 3, 2**64 - 1]


@needs_extension
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("D,d,mode", CASES, ids=IDS)
def test_extension_cpu_matches_dense(D, d, mode, generator):
    """The C++ kernel (fp32, generating B, Pi, G itself) against the float64 dense P of
    fastfood_params: output and P^T g through autograd."""
    P = dense_projection(D, d, SEED, mode, generator)
    theta = rand(d, dtype=torch.float32).requires_grad_()
    with kk.use_backend("cuda"):
        compare_with_reference(lambda t: kk.fastfood(t, D, SEED, mode, generator=generator), lambda t: P @ t, [theta],
                               RTOL[torch.float32], ref_dtype=torch.float64)


@needs_extension
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("D,d,mode", [(5000, 300, "stacked"), (70001, 2**12, "stacked"), (3000, 40, "padded"),
                                      (9, 9, "stacked")], ids=["tail", "full-lb", "padded", "one-block"])
def test_extension_cpu_same_projection_as_torch(D, d, mode, seed, generator):
    """Same seed, same P: B and Pi bit-identical (a difference would change outputs by O(1)), G
    within float32 rounding, so forward and P^T g agree to ~1e-6 with the float64 torch path."""
    theta = rand(d, dtype=torch.float32, seed=1)
    g = rand(D, dtype=torch.float32, seed=2)
    with kk.use_backend("torch"):
        t = theta.double().requires_grad_()
        want = kk.fastfood(t, D, seed, mode, generator=generator)
        (want_grad,) = torch.autograd.grad(want, t, g.double())
    with kk.use_backend("cuda"):
        t = theta.clone().requires_grad_()
        got = kk.fastfood(t, D, seed, mode, generator=generator)
        (got_grad,) = torch.autograd.grad(got, t, g)
    assert got.dtype == torch.float32 and got.shape == (D,)
    assert_rel_close(got, want, 1e-5, "P theta")
    assert_rel_close(got_grad, want_grad, 1e-5, "P^T g")


@needs_extension
def test_extension_cpu_transpose_identity_and_linearity():
    D, d = 20000, 300
    t1, t2 = rand(d, dtype=torch.float32, seed=1), rand(d, dtype=torch.float32, seed=2)
    g = rand(D, dtype=torch.float32, seed=3)
    with kk.use_backend("cuda"):
        y = kk.fastfood(t1, D, 8)
        combined = kk.fastfood(2.5 * t1 - 0.5 * t2, D, 8)
        assert_rel_close(combined, 2.5 * y - 0.5 * kk.fastfood(t2, D, 8), 1e-5, "linearity")
        theta = t1.clone().requires_grad_()
        (ptg,) = torch.autograd.grad(kk.fastfood(theta, D, 8), theta, g)
    lhs, rhs = torch.dot(y.double(), g.double()).item(), torch.dot(t1.double(), ptg.double()).item()
    assert abs(lhs - rhs) < 1e-5 * y.norm().item() * g.norm().item()


@needs_extension
@pytest.mark.parametrize("generator", GENERATORS)
def test_extension_cpu_backward_deterministic_across_threads(generator):
    """P^T g sums the blocks in a fixed split whatever the number of threads: bit-identical (and the
    forward: version 2's B words are reloaded at each thread's first element)."""
    D, d = 300000, 100
    g = rand(D, dtype=torch.float32)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            theta = torch.zeros(d, requires_grad=True)
            with kk.use_backend("cuda"):
                (grad,) = torch.autograd.grad(kk.fastfood(theta, D, 4, generator=generator), theta, g)
                # padded: one block of 2^19, its element loops split over the threads
                fwd = kk.fastfood(g[:d], D, 4, "padded", generator=generator)
            out.append((grad, fwd))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out[0][0], o[0]) and torch.equal(out[0][1], o[1]) for o in out[1:])
    # 3 threads split the block's 2^19 elements at 174763 (not a multiple of 32): still the projection
    with kk.use_backend("torch"):
        want = kk.fastfood(g[:d].double(), D, 4, "padded", generator=generator)
    assert_rel_close(out[2][1], want, 1e-5, "padded forward over threads")


@needs_extension
def test_extension_cpu_is_auto_and_low_precision():
    D, d = 4000, 96
    theta = rand(d, dtype=torch.float32)
    assert backend.select("fastfood", torch.device("cpu"), cuda_ops=ff._extension_devices()) == "cuda"
    with kk.use_backend("cuda"):
        want = kk.fastfood(theta, D, 3)
    assert torch.equal(kk.fastfood(theta, D, 3), want), "auto takes the C++ kernel on the CPU"
    P = dense_projection(D, d, 3)
    for dtype in (torch.float16, torch.bfloat16):
        with kk.use_backend("cuda"):
            compare_low_precision(lambda t: kk.fastfood(t, D, 3), dense_naive(P), [theta.clone().requires_grad_()],
                                  dtype)


def _binding_calls():
    """(call, error, match) of bad input reaching kron_kernels._C directly."""
    ext = backend.extension()
    f32 = torch.zeros(4)
    out = torch.zeros(10)
    return [
        (lambda: ext.fastfood_forward(f32.double(), out, 0, 4), TypeError, "theta must be float32"),
        (lambda: ext.fastfood_forward(f32, out.half(), 0, 4), TypeError, "out must be float32"),
        (lambda: ext.fastfood_forward(torch.zeros(2, 4), out, 0, 4), ValueError, "theta must be 1-D"),
        (lambda: ext.fastfood_forward(torch.zeros(8)[::2], out, 0, 4), ValueError, "theta must be contiguous"),
        (lambda: ext.fastfood_forward(f32, torch.zeros(0), 0, 4), ValueError, "out must be 1-D with at least one"),
        (lambda: ext.fastfood_forward(f32, out, 0, 6), ValueError, "Lb must be a power of two"),
        (lambda: ext.fastfood_forward(f32, out, 0, 2), ValueError, "d = 4 exceeds the block size Lb = 2"),
        (lambda: ext.fastfood_forward(f32, out, 0, 2**31), ValueError, "Lb must be a power of two <= 2"),
        (lambda: ext.fastfood_forward(f32, out, -1, 4), ValueError, "seed must be in"),
        (lambda: ext.fastfood_forward(f32, out, 2**64, 4), ValueError, "seed must be in"),
        (lambda: ext.fastfood_forward(f32, out, 1.5, 4), TypeError, "seed must be an int"),
        (lambda: ext.fastfood_forward(f32, out, True, 4), TypeError, "seed must be an int"),
        (lambda: ext.fastfood_forward(f32, torch.zeros(10, device="meta"), 0, 4), ValueError, "out is on meta"),
        (lambda: ext.fastfood_backward(out.int(), f32, 0, 4), TypeError, "grad must be float32"),
        (lambda: ext.fastfood_backward(out, torch.zeros(5), 0, 4), ValueError, "d = 5 exceeds the block size Lb = 4"),
        (lambda: ext.fastfood_backward(torch.zeros(2, 5), f32, 0, 4), ValueError, "grad must be 1-D"),
        (lambda: ext.fastfood_forward(f32, out, 0, 4, 3), ValueError, r"generator must be one of \(1, 2\), got 3"),
        (lambda: ext.fastfood_forward(f32, out, 0, 4, 2**70), ValueError, "generator must be one of"),
        (lambda: ext.fastfood_forward(f32, out, 0, 4, True), TypeError, "generator must be one of"),
        (lambda: ext.fastfood_forward(f32, out, 0, 4, 2.0), TypeError, "generator must be one of"),
        (lambda: ext.fastfood_backward(out, f32, 0, 4, 0), ValueError, "generator must be one of"),
        (lambda: ext.fastfood_backward(out, f32, 0, 4, None), TypeError, "generator must be one of"),
    ]


BINDING_IDS = ["theta-fp64", "out-fp16", "theta-2d", "theta-strided", "out-empty", "Lb-not-pow2", "d-above-Lb",
               "Lb-too-large", "seed-neg", "seed-2^64", "seed-float", "seed-bool", "out-other-device", "grad-int",
               "grad-d-above-Lb", "grad-2d", "generator-3", "generator-2^70", "generator-bool", "generator-float",
               "grad-generator-0", "grad-generator-none"]


@needs_extension
@pytest.mark.parametrize("index", range(len(BINDING_IDS)), ids=BINDING_IDS)
def test_extension_bad_input(index):
    """Bad input reaching the binding directly is a TypeError/ValueError naming the argument."""
    call, error, match = _binding_calls()[index]
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------- torch.compile
# (implementation, device, explicit params): every implementation on the CPU, the Triton kernels
# and the extension's CUDA kernels on a GPU; the extension takes no explicit params
COMPILE_CASES = [
    pytest.param("torch", "cpu", False, id="torch"),
    pytest.param("torch", "cpu", True, id="torch-params"),
    pytest.param("cuda", "cpu", False, id="extension-cpu", marks=needs_extension),
    pytest.param("triton", "cpu", False, id="triton-interpreter", marks=needs_interpreter),
    pytest.param("triton", "cpu", True, id="triton-interpreter-params", marks=needs_interpreter),
    pytest.param("triton", "cuda", False, id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", True, id="triton-cuda-params", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", False, id="extension-cuda", marks=[pytest.mark.gpu, needs_extension]),
]
# Lb = 32: a full block and a cut one (8 of 32 rows); two blocks only, as opcheck runs each op
# some twenty times and the interpreter takes ~20 ms per block to generate one
COMPILE_D, COMPILE_d = 40, 20
BIG_SEED = 2**63 + 5  # beyond int64: the custom ops take its two's complement


def _compile_params(explicit, device):
    return tuple(t.to(device) for t in kk.fastfood_params(COMPILE_D, COMPILE_d, BIG_SEED)) if explicit else None


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("impl, device, explicit", COMPILE_CASES)
def test_opcheck(impl, device, explicit, generator):
    """The custom ops ``kron_kernels::fastfood`` and ``kron_kernels::fastfood_transpose``
    (torch.compile's path): schema, fake tensor (shape, dtype, strides), autograd registration
    (each is the other's derivative) and AOT dispatch; and the op with the seed as its int64
    two's complement is exactly the eager ``kk.fastfood``."""
    D, d = COMPILE_D, COMPILE_d
    Lb, nb = ff.fastfood_block_size(D, d)
    params = _compile_params(explicit, device)
    if explicit and generator != 1:
        pytest.skip("explicit params generate nothing: the generator is not used")
    args = (Lb, nb, ff._seed_arg(BIG_SEED), *(params or (None, None, None)), impl, generator)
    theta = rand(d, dtype=torch.float32, device=device).requires_grad_()
    g = rand(D, dtype=torch.float32, seed=1, device=device).requires_grad_()
    torch.library.opcheck(ff._fastfood_op, (theta, D, *args))
    torch.library.opcheck(ff._fastfood_transpose_op, (g, d, *args))
    with kk.use_backend(impl):
        want = kk.fastfood(theta.detach(), D, BIG_SEED, params=params, generator=generator)
    assert torch.equal(ff._fastfood_op(theta.detach(), D, *args), want)


@pytest.mark.slow  # Inductor's first compile in a process, C++ codegen with a cold cache: ~10 s
@pytest.mark.parametrize("impl, device, explicit", COMPILE_CASES)
def test_torch_compile_fullgraph(impl, device, explicit, fresh_dynamo):
    """``torch.compile(fullgraph=True)`` captures kk.fastfood without a graph break (it raises
    otherwise; with explicit params too: their data-dependent permutation check moves into the
    op) and equals eager bit for bit, forward and backward: the same kernels on the same
    values; around them only a copy of the strided theta and the slice's backward, exact."""
    params = _compile_params(explicit, device)
    theta = rand(2 * COMPILE_d, dtype=torch.float32, device=device).requires_grad_()

    def fn(theta):
        return kk.fastfood(theta[::2], COMPILE_D, BIG_SEED, params=params)

    with kk.use_backend(impl):
        want = outputs_and_grads(fn, [theta])
        got = outputs_and_grads(torch.compile(fn, fullgraph=True), [theta])
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_torch_compile_checks_permutations(fresh_dynamo):
    """Under torch.compile the custom op checks explicit params' permutations when it runs."""
    bad = (torch.ones(3, 4), torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4))
    compiled = torch.compile(lambda t: kk.fastfood(t, 10, params=bad), fullgraph=True)
    with kk.use_backend("torch"), pytest.raises(ValueError, match="params Pi: every row must be a permutation"):
        compiled(torch.zeros(4))


@needs_interpreter
def test_torch_compile_backend_change_recompiles(monkeypatch, fresh_dynamo):
    """A function compiled under 'torch' recompiles under 'triton' (Dynamo guards on the backend
    selected in Python, outside the graph) and runs the Triton kernels, forward and backward,
    giving their eager results; the first graph serves 'torch' again."""
    from kron_kernels.triton import fastfood as triton_fastfood

    calls = []

    def counting(name):
        kernel = getattr(triton_fastfood, name)
        return lambda *args, **kwargs: calls.append(name) or kernel(*args, **kwargs)

    for name in ("fastfood_forward", "fastfood_transpose"):
        monkeypatch.setattr(triton_fastfood, name, counting(name))
    theta = rand(COMPILE_d, dtype=torch.float32).requires_grad_()

    def fn(theta):
        return kk.fastfood(theta, COMPILE_D, BIG_SEED)

    compiled = torch.compile(fn, fullgraph=True)
    for impl in ("torch", "triton", "torch"):
        with kk.use_backend(impl):
            want = outputs_and_grads(fn, [theta])
            del calls[:]
            got = outputs_and_grads(compiled, [theta])
        assert calls == (["fastfood_forward", "fastfood_transpose"] if impl == "triton" else []), impl
        for name in want:
            assert torch.equal(got[name], want[name]), (impl, name)


# ------------------------------------------------------------------------------------- GPU
# auto takes the extension's CUDA kernels where it is built: the Triton kernels (Lb <= 2^13; a
# larger block runs the chain with kk.fwht's Triton transforms) are named explicitly
GPU_IMPLS = ["auto", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("D,d,mode", [(10**6 + 3, 2**13, "stacked"), (86 * 10**5, 1000, "stacked"),
                                      (5000, 1000, "padded"), (300000, 64, "padded")],
                         ids=["Lb8192-cut", "Lb1024-8400-blocks", "padded-Lb8192", "padded-Lb2^19"])
def test_gpu_same_projection_as_cpu(D, d, mode, impl):
    theta = rand(d, dtype=torch.float32)
    g = rand(D, dtype=torch.float32, seed=1)
    with kk.use_backend("torch"):
        want = kk.fastfood(theta.double(), D, 17, mode)
        t = theta.double().requires_grad_()
        (want_grad,) = torch.autograd.grad(kk.fastfood(t, D, 17, mode), t, g.double())
    tc = theta.cuda().requires_grad_()
    with kk.use_backend(impl):
        got = kk.fastfood(tc, D, 17, mode)
        (got_grad,) = torch.autograd.grad(got, tc, g.cuda())
    assert_rel_close(got, want, 1e-5, "P theta on CUDA vs CPU")
    assert_rel_close(got_grad, want_grad, 1e-4, "P^T g on CUDA vs CPU (sums over D / Lb blocks)")


def _cpu_block(theta, D, seed, Lb, j):
    """Rows of block j of P theta in float64 on the CPU from that block's B, Pi, G alone (the block
    structure: no other block, nothing of size D)."""
    p = ff._generate(seed, Lb, 1, torch.device("cpu"), first=j)
    x = torch.zeros(1, Lb, dtype=torch.float64)
    x[0, :theta.numel()] = theta.double()
    x = fwht_butterfly(x * p["B"].double())
    x = torch.gather(x, 1, p["Pi"]) * p["G"].double()
    return (fwht_butterfly(x) / (p["G"].double().norm() * math.sqrt(D)))[0, :min(Lb, D - j * Lb)]


def _cpu_block_transpose(g_rows, D, seed, Lb, j, d):
    """(block j of P)^T g_rows in float64 on the CPU."""
    p = ff._generate(seed, Lb, 1, torch.device("cpu"), first=j)
    w = torch.zeros(1, Lb, dtype=torch.float64)
    w[0, :g_rows.numel()] = g_rows.double()
    w = fwht_butterfly(w) / (p["G"].double().norm() * math.sqrt(D)) * p["G"].double()
    z = torch.zeros_like(w).scatter_(1, p["Pi"], w)  # Pi^T
    return (fwht_butterfly(z) * p["B"].double())[0, :d]


@pytest.mark.gpu
@pytest.mark.parametrize("D, d, impl", [
    pytest.param(2**31 + 1000, 1024, "auto", id="D2^31+1000-Lb1024-auto"),
    pytest.param(2**31 + 1000, 1024, "triton", id="D2^31+1000-Lb1024-triton"),
    # the block size on the CUDA kernel (the Triton path would take the kk.fwht chain with
    # stored (nb, Lb) B / Pi / G: ~50 GB at this D)
    pytest.param(2**31 + 2**14 + 7, 2**14, "auto", id="D2^31+2^14+7-Lb16384-auto"),
])
def test_gpu_beyond_int32_offsets(D, d, impl):
    """D > 2^31 (8.6 GB of fp32 output): the first block, the blocks on either side of the offset
    2^31 and the (cut) last block against the CPU chain of each block alone, and P^T g for a g
    that is zero outside those blocks against the sum of their transposes."""
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 4 * D:
        pytest.skip(f"needs {3 * 4 * D / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB are")
    seed = 5
    Lb, nb = ff.fastfood_block_size(D, d)
    blocks = sorted({0, 2**31 // Lb - 1, 2**31 // Lb, nb - 1})
    assert blocks[-1] == nb - 1 and (nb - 1) * Lb >= 2**31 - Lb
    theta = rand(d, dtype=torch.float32)
    tc = theta.cuda().requires_grad_()
    with kk.use_backend(impl):
        out = kk.fastfood(tc, D, seed)
    assert not out.isnan().any()
    g = torch.zeros(D, device="cuda")
    want_grad = torch.zeros(d, dtype=torch.float64)
    for j in blocks:
        start = j * Lb
        want = _cpu_block(theta, D, seed, Lb, j)
        assert_rel_close(out[start:start + want.numel()].detach().cpu(), want, 1e-5, f"block {j} (rows from {start})")
        g_rows = rand(want.numel(), dtype=torch.float32, seed=j % 1000 + 2)
        g[start:start + want.numel()] = g_rows.cuda()
        want_grad += _cpu_block_transpose(g_rows, D, seed, Lb, j, d)
    with kk.use_backend(impl):
        (got,) = torch.autograd.grad(out, tc, g)
    del out, g
    torch.cuda.empty_cache()
    assert_rel_close(got.cpu(), want_grad, 1e-5, "P^T g of the chosen blocks")


def _back_to_the_middle(y, Lb, D):
    """Block by block ``H y sqrt(D) / Lb`` in float64: for a full block of ``y = P theta`` this is
    ``G_j * Pi_j(H B_j theta) / ||G_j||`` (H H = Lb I)."""
    return fwht_butterfly(y.detach().double().cpu().view(-1, Lb)) * math.sqrt(D) / Lb


# (implementation, device, log2 Lb): the CUDA kernel at every block size it takes and the Triton
# path (beyond 2^13 its kk.fwht chain with the generator on CUDA) on a GPU; on the CPU the C++
# kernel and the Triton kernel under the interpreter at a few sizes (the same recovery, checked here)
GENERATOR_IDENTITY = (
    [pytest.param("cuda", "cuda", k, id=f"extension-cuda-Lb{2**k}", marks=[pytest.mark.gpu, needs_extension])
     for k in range(16)]
    + [pytest.param("triton", "cuda", k, id=f"triton-cuda-Lb{2**k}", marks=pytest.mark.gpu) for k in range(16)]
    + [pytest.param("cuda", "cpu", k, id=f"extension-cpu-Lb{2**k}", marks=needs_extension) for k in (0, 1, 3, 8, 11)]
    + [pytest.param("triton", "cpu", k, id=f"triton-interpreter-Lb{2**k}", marks=needs_interpreter) for k in (2, 5)]
)


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("impl, device, log_lb", GENERATOR_IDENTITY)
def test_generated_b_pi_g_are_the_documented_ones(impl, device, log_lb, generator):
    """B and Pi bit-identical with ``kk.fastfood_params`` (the CPU's definition), G within the
    documented float32 bound, for one seed, read back from the kernel's own output. With d = Lb
    and theta = e_i, block j transformed back (``_back_to_the_middle``) is
    z_i[k] = B_j[i] H[Pi_j[k], i] G_j[k] / ||G_j||:

    * e_0 gives B_j[0] G_j / ||G_j||: G to 1e-5 of its largest entry (the module docstring: |dG| <=
      1e-5 of |G| <= 5.77, plus the fp32 transforms);
    * e_(2^b) has H[Pi_j[k], 2^b] = (-1)^(bit b of Pi_j[k]): every bit of every Pi_j[k] from the sign
      of z_(2^b)[k] z_0[k] B_j[0] B_j[2^b] -- exactly, wherever |G_j[k]| is above 1e-5 of its
      largest (a few entries of 2^15 fall below: their sign drowns in fp32 rounding);
    * theta in [1, 2]^d pins every B_j[i]: one flipped sign moves the result by at least
      2 |G_j[k]| / ||G_j|| at each k, over 4e-3 of its largest entry at Lb = 2^15, the tolerance 1e-5."""
    if impl == "cuda" and device == "cuda":
        max_log = ff._cuda_max_log_lb(torch.cuda.current_device())
        if log_lb > max_log:
            pytest.skip(f"Lb = 2^{log_lb} exceeds this GPU's shared memory (2^{max_log})")
    Lb, seed = 2**log_lb, 2**40 + 7
    d, nb = Lb, 3
    D = nb * Lb
    assert ff.fastfood_block_size(D, d) == (Lb, nb)
    B, Pi, G = kk.fastfood_params(D, d, seed, generator=generator)
    B, G = B.double(), G.double()
    G_unit = G / G.norm(dim=1, keepdim=True)

    def middle(theta):
        with kk.use_backend(impl):
            return _back_to_the_middle(kk.fastfood(theta.to(device), D, seed, generator=generator), Lb, D)

    eye = torch.eye(d)
    z0 = middle(eye[0])
    assert_rel_close(z0, B[:, :1] * G_unit, 1e-5, "G_j / ||G_j|| (times B_j[0])")
    clear = G_unit.abs() > 1e-5 * G_unit.abs().amax(dim=1, keepdim=True)
    assert (~clear).sum().item() <= max(2, nb * Lb // 2000), "G entries too small to read Pi's bits at"
    pi = torch.zeros(nb, Lb, dtype=torch.int64)
    for b in range(log_lb):
        zb = middle(eye[2**b])
        pi |= ((zb * z0 < 0) ^ (B[:, 2**b:2**b + 1] != B[:, :1])).long() << b
    assert torch.equal(pi[clear], Pi[clear]), "Pi read back from the kernel's output"
    theta = 1 + torch.rand(d, generator=torch.Generator().manual_seed(0))
    want = G_unit * torch.gather(fwht_butterfly(B * theta.double()), 1, Pi)
    assert_rel_close(middle(theta), want, 1e-5, "every B_j[i] (theta in [1, 2]^d)")


# ------------------------------------------- the CUDA kernels' code on the host (no GPU needed)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """csrc/emulation/fastfood_emulate.cpp compiled with the host compiler: the kernels of
    csrc/fastfood_cuda.cuh run with every CUDA thread a std::thread (barriers, warp shuffles
    through a buffer). It checks their indexing, layouts, barriers and reductions where no GPU
    exists; not the launchers, alignment or speed (the gpu tests do)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    home = _build.cuda_home()
    if cxx is None or home is None or not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        pytest.skip("needs a host C++ compiler and the CUDA toolkit's headers")
    exe = str(tmp_path_factory.mktemp("emulation") / "fastfood_emulate")
    src = os.path.join(ROOT, "csrc", "emulation", "fastfood_emulate.cpp")
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-I", os.path.join(home, "include"), src, "-o", exe],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("the host compiler has no C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _emulate(exe, tmp_path, mode, log_lb, D, seed, grid, x, generator=1):
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    x.numpy().astype("<f4").tofile(src)
    subprocess.run([exe, mode, str(log_lb), str(D), str(seed), str(grid), str(src), str(dst), str(generator)],
                   check=True, timeout=600)
    return torch.from_numpy(__import__("numpy").fromfile(dst, dtype="<f4"))


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("log_lb", [0, 1, 2, 3, 5, 8, 9, 10, 13, 14, pytest.param(15, marks=pytest.mark.slow)],
                         ids=lambda k: f"Lb{2**k}")
def test_cuda_kernels_emulated_on_host(emulator, tmp_path, log_lb, generator):
    """The CUDA kernels' own code against the float64 torch path, two persistent CTAs walking
    every block (several row groups per CTA below Lb = 2^10; rows over 2 warps at 2^9 with two
    groups; the exchange through shared memory from 2^9; the cut last block; groups past the
    last block in the final round): outputs and the partial rows' sum, 1e-5. For both generator
    versions: version 2's kernels share a B word among a thread's 8 elements and one Box--Muller
    evaluation per pair (Lb = 1, 2, 4: a thread holds the whole block, fewer than 8 elements)."""
    Lb, seed = 2**log_lb, 2**63 + 11
    d = Lb // 2 + 1 if Lb > 2 else Lb  # stacked mode: Lb = 2^ceil(log2 d)
    D = max(3 * Lb, 700) + 5
    assert ff.fastfood_block_size(D, d) == (Lb, -(-D // Lb))
    theta, g = rand(d, dtype=torch.float32), rand(D, dtype=torch.float32, seed=1)
    with kk.use_backend("torch"):
        t = theta.double().requires_grad_()
        want = kk.fastfood(t, D, seed, generator=generator)
        (want_grad,) = torch.autograd.grad(want, t, g.double())
    got = _emulate(emulator, tmp_path, "fwd", log_lb, D, seed, 2, theta, generator)
    partial = _emulate(emulator, tmp_path, "bwd", log_lb, D, seed, 2, g, generator)
    assert partial.numel() % Lb == 0 and not torch.isnan(partial).any(), "every partial row written"
    assert_rel_close(got, want, 1e-5, "P theta (emulated CUDA kernel)")
    assert_rel_close(partial.view(-1, Lb).sum(0)[:d], want_grad, 1e-5, "P^T g (emulated CUDA kernel)")


def test_cuda_exchange_is_bank_conflict_free(emulator):
    """The transform's shared-memory exchange (csrc/fwht_cuda.cuh ``exchange_slot``, shared by the
    fwht and fastfood CUDA kernels): every warp-wide store and load -- row-major and transposed,
    at 2, 4 and 8 warps per row -- touches all 32 banks once (row-major slots of 8 floats were
    8-way conflicts: 1.25 of the 1.80 shared-memory passes per Fastfood element in the roofline,
    docs/fastfood_roofline.md), and each row keeps its slots (the emulated kernels above check
    the values)."""
    proc = subprocess.run([emulator, "banks"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout


def _extension_pair(theta, g, D, seed, mode, device, generator=1):
    """(P theta, P^T g) by the compiled kernels on ``device`` (fp32)."""
    t = theta.to(device).requires_grad_()
    with kk.use_backend("cuda"):
        y = kk.fastfood(t, D, seed, mode, generator=generator)
        (grad,) = torch.autograd.grad(y, t, g.to(device))
    return y.detach().cpu(), grad.cpu()


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("log_lb", range(16), ids=[f"Lb{2**k}" for k in range(16)])
def test_gpu_extension_matches_cpu_extension(log_lb, generator):
    """The CUDA kernel against the C++ one for every block size it takes: several row groups per
    CTA (small Lb), a persistent grid with more blocks than CTAs, a cut last block, d not a
    power of two. B and Pi are the same integer functions (a difference would change outputs by
    O(1)); G differs by libdevice vs libm rounding, ||G_j|| by its fp32 block reduction."""
    max_log = ff._cuda_max_log_lb(torch.cuda.current_device())
    if log_lb > max_log:
        pytest.skip(f"Lb = 2^{log_lb} exceeds this GPU's shared memory (2^{max_log})")
    Lb = 2**log_lb
    d, D = Lb // 2 + 1 if Lb > 2 else Lb, max(37 * Lb, 100000) + 5  # stacked: Lb = 2^ceil(log2 d)
    assert ff.fastfood_block_size(D, d)[0] == Lb
    theta, g = rand(d, dtype=torch.float32), rand(D, dtype=torch.float32, seed=1)
    want = _extension_pair(theta, g, D, 2**40 + 7, "stacked", "cpu", generator)
    got = _extension_pair(theta, g, D, 2**40 + 7, "stacked", "cuda", generator)
    assert_rel_close(got[0], want[0], 1e-5, "P theta CUDA vs CPU")
    assert_rel_close(got[1], want[1], 1e-4, "P^T g CUDA vs CPU (sums over D / Lb blocks)")


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("generator", GENERATORS)
def test_gpu_extension_target_size_and_padded(generator):
    """d = 2^14 into D ~ 1e7 (the issue's block size), and padded mode with a single block."""
    for D, d, mode in ((10**7 + 11, 2**14, "stacked"), (20000, 300, "padded")):
        theta, g = rand(d, dtype=torch.float32), rand(D, dtype=torch.float32, seed=1)
        want = _extension_pair(theta, g, D, 12, mode, "cpu", generator)
        got = _extension_pair(theta, g, D, 12, mode, "cuda", generator)
        assert_rel_close(got[0], want[0], 1e-5, f"P theta {mode}")
        assert_rel_close(got[1], want[1], 1e-4, f"P^T g {mode}")


@pytest.mark.gpu
@needs_extension
def test_gpu_extension_misaligned_grad_and_refusal():
    ext = backend.extension()
    D, Lb = 5000, 64
    base = rand(D + 1, dtype=torch.float32).cuda()
    aligned = base[1:].clone()
    a, b = torch.empty(Lb, device="cuda"), torch.empty(Lb, device="cuda")
    ext.fastfood_backward(base[1:], a, 3, Lb)  # a view 4 bytes into its allocation: copied
    ext.fastfood_backward(aligned, b, 3, Lb)
    assert torch.equal(a, b)
    max_log = ff._cuda_max_log_lb(torch.cuda.current_device())
    theta = torch.zeros(2 ** (max_log + 1), device="cuda")
    with kk.use_backend("cuda"), pytest.raises(kk.BackendUnavailableError, match="shared memory"):
        kk.fastfood(theta, 10**6)
    assert kk.fastfood(theta, 10**6).abs().max().item() == 0.0  # auto falls back
    # the extension's own refusal, called directly, in a child process: on an H200 (commit
    # 93d8659) this call killed the pytest worker with a segmentation fault instead of raising,
    # so a crash must come back as this test's failure with the child's output, not a lost worker
    child = textwrap.dedent(f"""
        import torch
        from kron_kernels import backend
        theta = torch.zeros(2 ** {max_log + 1}, device="cuda")
        try:
            backend.extension().fastfood_forward(theta, torch.empty(10**6, device="cuda"), 0, theta.numel())
        except ValueError as e:
            assert "does not fit the CUDA kernel" in str(e), e
            print("refused")
    """)
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", child], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", (
        f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
