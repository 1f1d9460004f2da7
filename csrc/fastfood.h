// Fastfood projection kernels of kron_kernels._C: the counter-based generator of B, Pi and G
// (the definition is the module docstring of kron_kernels/ops/fastfood.py), written once as
// inline functions that both the C++ CPU kernel (fastfood_cpu.cpp, tested on every machine)
// and the CUDA kernel (fastfood_cuda.cu) call, plus the kernels' interface (raw pointers, no
// torch types: fastfood_cuda.cu includes no torch header, as fwht.h explains).
//
// All words are uint32_t, whose + and * wrap mod 2^32 as the definition requires. B and Pi are
// integer functions, bit-identical with kk.fastfood_params; G is float32 Box--Muller on exact
// 24-bit uniforms, within a few float32 ulps of fastfood_params' (float64, rounded once) value.
// Two generator versions (the docstring defines both): 1, one B word and one Box--Muller
// evaluation per element (sign, gaussian); 2, one B word per 32 elements (sign_bit of
// sign_word_v2) and one Box--Muller evaluation per pair of elements (gaussian_pair_v2).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KK_HOST_DEVICE __host__ __device__ __forceinline__
#define KK_UNROLL _Pragma("unroll")
// libdevice's accurate logf/cosf, called by name: the extension is compiled with
// --use_fast_math, which turns logf/cosf into lg2.approx/cos.approx (absolute error ~1e-7 in
// ln u1 near u1 = 1 is a large relative error of sqrt(-2 ln u1)); these calls stay accurate.
extern "C" __device__ float __nv_logf(float);
extern "C" __device__ float __nv_cosf(float);
extern "C" __device__ void __nv_sincosf(float, float*, float*);
#else
#define KK_HOST_DEVICE inline
#define KK_UNROLL
#endif

namespace kron_kernels {
namespace fastfood {

constexpr uint32_t kWeyl = 0x9E3779B9u;  // 2^32 / golden ratio
constexpr uint32_t kMixC1 = 0x85EBCA6Bu, kMixC2 = 0xC2B2AE35u;
constexpr uint32_t kStreamB = 1, kStreamGRadius = 2, kStreamGAngle = 3, kStreamPi = 4;
constexpr int kPiRounds = 6;  // both generator versions
// generator versions (ops/_fastfood_generator.py: GENERATORS, DEFAULT_GENERATOR)
constexpr int kGeneratorV1 = 1, kGeneratorV2 = 2, kDefaultGenerator = kGeneratorV1;
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24, exact
constexpr float kPiF = 3.14159265358979323846f;          // float(pi), as Triton's constant

// MurmurHash3's fmix32: a bijection of 32-bit words with full avalanche.
KK_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixC1;
  x ^= x >> 13;
  x *= kMixC2;
  x ^= x >> 16;
  return x;
}

// key(s) = mix(mix(seed_lo + s) ^ seed_hi)
KK_HOST_DEVICE uint32_t stream_key(uint64_t seed, uint32_t stream) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return mix32(mix32(lo + stream) ^ hi);
}

// key(s, j) = mix(key(s) + j * W) for the four streams of block j (j < 2^32: the Python side
// refuses more blocks).
struct BlockKeys {
  uint32_t b, radius, angle, pi;
};

KK_HOST_DEVICE BlockKeys block_keys(uint64_t seed, uint32_t j) {
  BlockKeys k;
  k.b = mix32(stream_key(seed, kStreamB) + j * kWeyl);
  k.radius = mix32(stream_key(seed, kStreamGRadius) + j * kWeyl);
  k.angle = mix32(stream_key(seed, kStreamGAngle) + j * kWeyl);
  k.pi = mix32(stream_key(seed, kStreamPi) + j * kWeyl);
  return k;
}

// word(s, j, i) = mix(key(s, j) + i * W)
KK_HOST_DEVICE uint32_t word(uint32_t block_key, uint32_t i) { return mix32(block_key + i * kWeyl); }

// B_j[i] = 1 - 2 * (top bit of word(B, j, i))
KK_HOST_DEVICE float sign(uint32_t key_b, uint32_t i) { return (word(key_b, i) >> 31) != 0u ? -1.f : 1.f; }

KK_HOST_DEVICE float accurate_logf(float x) {
#if defined(__CUDA_ARCH__)
  return __nv_logf(x);
#else
  return std::log(x);
#endif
}

KK_HOST_DEVICE float accurate_cosf(float x) {
#if defined(__CUDA_ARCH__)
  return __nv_cosf(x);
#else
  return std::cos(x);
#endif
}

// correctly rounded on both sides (--use_fast_math makes sqrtf approximate on the device)
KK_HOST_DEVICE float rounded_sqrtf(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// sin and cos of one angle, both accurate (libdevice's __nv_sincosf on the device)
KK_HOST_DEVICE void accurate_sincosf(float x, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  __nv_sincosf(x, s, c);
#else
  *s = std::sin(x);
  *c = std::cos(x);
#endif
}

// u1 in (0, 1] and u2 in [0, 1) from the top 24 bits of the radius and angle words of counter i
// (exact in float32, as is 2 u2 - 1); returns sqrt(-2 ln u1) and sets *angle = pi (2 u2 - 1)
KK_HOST_DEVICE float box_muller_radius(uint32_t key_radius, uint32_t key_angle, uint32_t i, float* angle) {
  const float u1 = static_cast<float>((word(key_radius, i) >> 8) + 1u) * kTwoPow24Inv;
  const float u2 = static_cast<float>(word(key_angle, i) >> 8) * kTwoPow24Inv;
  *angle = (2.f * u2 - 1.f) * kPiF;
  return rounded_sqrtf(-2.f * accurate_logf(u1));
}

// generator 1: G_j[i] = sqrt(-2 ln u1) cos(pi (2 u2 - 1)) from the words of counter i
KK_HOST_DEVICE float gaussian(uint32_t key_radius, uint32_t key_angle, uint32_t i) {
  float angle;
  const float radius = box_muller_radius(key_radius, key_angle, i, &angle);
  return radius * accurate_cosf(angle);
}

// generator 2: G_j[2 i2] = R cos(theta) (*even), G_j[2 i2 + 1] = R sin(theta) (*odd), R and theta
// from the words of counter i2 (one evaluation for the pair)
KK_HOST_DEVICE void gaussian_pair_v2(uint32_t key_radius, uint32_t key_angle, uint32_t i2, float* even,
                                     float* odd) {
  float angle, s, c;
  const float radius = box_muller_radius(key_radius, key_angle, i2, &angle);
  accurate_sincosf(angle, &s, &c);
  *even = radius * c;
  *odd = radius * s;
}

// generator 2: word(B, j, i >> 5) holds the signs of elements 32 (i >> 5) .. 32 (i >> 5) + 31,
// B_j[i] = 1 - 2 * bit (i & 31) of it
KK_HOST_DEVICE uint32_t sign_word_v2(uint32_t key_b, uint32_t i) { return word(key_b, i >> 5); }
KK_HOST_DEVICE float sign_bit(uint32_t w, uint32_t bit) { return ((w >> bit) & 1u) != 0u ? -1.f : 1.f; }

// B_j[i] of either version (for loops that do not share words)
KK_HOST_DEVICE float sign_of(int generator, uint32_t key_b, uint32_t i) {
  return generator == kGeneratorV1 ? sign(key_b, i) : sign_bit(sign_word_v2(key_b, i), i & 31u);
}

// ------------------------------------------------------------------ the permutation Pi_j
// The keyed Feistel network on n = log2(Lb) bits, h = n / 2: x ^= key mod 2^n, then round r:
// hi = x >> h (n - h bits), lo = x mod 2^h, lo ^= F_r(hi), x = (lo << (n - h)) | hi with
// F_r(hi) = mix(K_r ^ hi) mod 2^h, K_r = mix(key + (r + 1) W). F_r only ever sees the n - h
// bits of hi, so a block's six round functions are a table of 6 * 2^(n - h) entries (256 per
// round at Lb = 2^15) that replaces the six mixes per element by six lookups. Entries are
// below 2^h <= 2^15: uint16_t.
struct FeistelShape {
  int n, h;
  uint32_t mask_n, mask_h, mask_hi;
};

KK_HOST_DEVICE FeistelShape feistel_shape(int log_lb) {
  FeistelShape s;
  s.n = log_lb;
  s.h = log_lb / 2;
  s.mask_n = (1u << s.n) - 1u;  // log_lb <= 30: no shift by 32
  s.mask_h = (1u << s.h) - 1u;
  s.mask_hi = (1u << (s.n - s.h)) - 1u;
  return s;
}

KK_HOST_DEVICE int feistel_table_size(int log_lb) { return kPiRounds << (log_lb - log_lb / 2); }

// entry idx = (r << (n - h)) | hi of block key key_pi's table
KK_HOST_DEVICE uint16_t feistel_table_entry(uint32_t key_pi, const FeistelShape& s, int idx) {
  const int r = idx >> (s.n - s.h);
  const uint32_t hi = static_cast<uint32_t>(idx) & s.mask_hi;
  const uint32_t round_key = mix32(key_pi + static_cast<uint32_t>(r + 1) * kWeyl);
  return static_cast<uint16_t>(mix32(round_key ^ hi) & s.mask_h);
}

// Pi_j[k] (gather semantics: (Pi x)[k] = x[Pi[k]])
KK_HOST_DEVICE uint32_t feistel_forward(uint32_t x, uint32_t key_pi, const FeistelShape& s, const uint16_t* table) {
  x ^= key_pi & s.mask_n;
KK_UNROLL
  for (int r = 0; r < kPiRounds; ++r) {
    const uint32_t hi = x >> s.h, lo = (x & s.mask_h) ^ table[(r << (s.n - s.h)) | hi];
    x = (lo << (s.n - s.h)) | hi;
  }
  return x;
}

// Pi_j^-1[m]: the rounds backwards, so (Pi^T w)[m] = w[Pi^-1[m]] is a gather too
KK_HOST_DEVICE uint32_t feistel_inverse(uint32_t x, uint32_t key_pi, const FeistelShape& s, const uint16_t* table) {
KK_UNROLL
  for (int r = kPiRounds - 1; r >= 0; --r) {
    const uint32_t hi = x & s.mask_hi, lo = (x >> (s.n - s.h)) ^ table[(r << (s.n - s.h)) | hi];
    x = (hi << s.h) | lo;
  }
  return x ^ (key_pi & s.mask_n);
}

}  // namespace fastfood

// ------------------------------------------------------------------ kernel interface
// y = P theta: theta (d,) fp32, out (D,) fp32, Lb = 2^log_lb >= d, nb = ceil(D / Lb) <= 2^32
// blocks; rows j * Lb .. min(D, (j + 1) * Lb) of out are block j. Arithmetic in fp32.
constexpr int kFastfoodCpuMaxLog = 30;  // the CPU kernel's block sizes (kk.fwht's limit)

// generator: kGeneratorV1 or kGeneratorV2 (the bindings refuse anything else).
void fastfood_forward_cpu(const float* theta, int64_t d, float* out, int64_t D, int log_lb, uint64_t seed,
                          int generator);
// out (d,) = P^T grad for grad (D,): summed over blocks in a fixed order whatever the number of
// threads (deterministic).
void fastfood_backward_cpu(const float* grad, int64_t D, float* out, int64_t d, int log_lb, uint64_t seed,
                           int generator);

#ifdef KRON_KERNELS_WITH_CUDA
// The CUDA kernels hold one block in shared memory (Lb fp32) and registers: Lb <= 2^15 and
// the device's opt-in shared memory per block. The largest log2(Lb) that device supports (-1
// when the query fails).
constexpr int kFastfoodCudaMaxLog = 15;
int fastfood_cuda_max_log_lb(int device);
// Forward on the given stream; out 16-byte aligned. Returns a cudaError_t as an int.
int fastfood_forward_cuda(const float* theta, int64_t d, float* out, int64_t D, int log_lb, uint64_t seed,
                          int generator, void* stream);
// Backward: partial (rows, Lb) fp32, rows = fastfood_backward_cuda_rows(...) on this device,
// every row written (a persistent row group's sum over its blocks); the caller sums the rows
// (deterministic) and keeps the first d entries. grad 16-byte aligned.
int64_t fastfood_backward_cuda_rows(int64_t D, int log_lb, int device, int generator);
int fastfood_backward_cuda(const float* grad, int64_t D, float* partial, int64_t rows, int log_lb, uint64_t seed,
                           int generator, void* stream);
#endif

}  // namespace kron_kernels
