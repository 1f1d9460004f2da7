// CPU Fastfood projection: block j of P theta is H G_j Pi_j H B_j pad(theta) / (||G_j|| sqrt(D)),
// B_j, Pi_j, G_j regenerated from (seed, j, index) by fastfood.h -- the same functions the CUDA
// kernel calls -- so nothing but theta and the output is ever in memory.
//
// Blocks are split across at::parallel_for's threads when there are at least as many blocks as
// threads; each thread keeps three Lb-float buffers and the block's Feistel table. Otherwise
// (few, large blocks: padded mode) the blocks run one after the other on the calling thread and
// the element loops inside a block, at::parallel_for loops too, spread over the threads (inside
// a parallel region they run inline).
// fp32 arithmetic; ||G_j||^2 is summed in float64, as the torch path's norm.
// Generator 2 (fastfood.h) shares the work the way the CUDA kernel does: one Box--Muller
// evaluation per pair of elements (the G loop runs over the pairs) and one B word per 32 elements
// (loaded again at the start of each thread's chunk of elements).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastfood.h"
#include "fwht.h"

namespace kron_kernels {
namespace {

using namespace fastfood;

constexpr int64_t kElementGrain = int64_t{1} << 14;

struct BlockScratch {
  std::vector<float> x, y, g;
  std::vector<uint16_t> table;
  BlockScratch(int64_t lb, int log_lb) : x(lb), y(lb), g(lb), table(feistel_table_size(log_lb)) {}
};

void fill_table(uint16_t* table, uint32_t key_pi, const FeistelShape& shape, int log_lb) {
  const int size = feistel_table_size(log_lb);
  for (int idx = 0; idx < size; ++idx) table[idx] = feistel_table_entry(key_pi, shape, idx);
}

// g[k] = G_j[k]; returns 1 / (||G_j|| sqrt(D)) (norm in float64)
float gaussians_and_scale(float* g, const BlockKeys& keys, int64_t lb, int64_t D, int generator) {
  if (generator == kGeneratorV1) {
    at::parallel_for(0, lb, kElementGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) g[k] = gaussian(keys.radius, keys.angle, static_cast<uint32_t>(k));
    });
  } else {  // pairs i2 = 0 .. ceil(lb / 2) - 1: one evaluation each (lb = 1 keeps the cosine)
    at::parallel_for(0, (lb + 1) / 2, kElementGrain / 2, [&](int64_t begin, int64_t end) {
      for (int64_t i2 = begin; i2 < end; ++i2) {
        float even, odd;
        gaussian_pair_v2(keys.radius, keys.angle, static_cast<uint32_t>(i2), &even, &odd);
        g[2 * i2] = even;
        if (2 * i2 + 1 < lb) g[2 * i2 + 1] = odd;
      }
    });
  }
  double norm2 = 0.0;
  for (int64_t k = 0; k < lb; ++k) norm2 += static_cast<double>(g[k]) * g[k];
  return static_cast<float>(1.0 / (std::sqrt(norm2) * std::sqrt(static_cast<double>(D))));
}

// x[i] = (i < d ? theta[i] : 0) * B_j[i] for i in [begin, end)
void signed_input(float* x, const float* theta, int64_t d, uint32_t key_b, int64_t begin, int64_t end,
                  int generator) {
  if (generator == kGeneratorV1) {
    for (int64_t i = begin; i < end; ++i) x[i] = (i < d ? theta[i] : 0.f) * sign(key_b, static_cast<uint32_t>(i));
    return;
  }
  uint32_t w = 0;
  for (int64_t i = begin; i < end; ++i) {
    if (i == begin || (i & 31) == 0) w = sign_word_v2(key_b, static_cast<uint32_t>(i));  // one word per 32
    x[i] = (i < d ? theta[i] : 0.f) * sign_bit(w, static_cast<uint32_t>(i & 31));
  }
}

// body(begin, end) over [0, n): across threads when n covers them, else on this thread (whose
// element loops then go parallel)
template <typename Body>
void for_blocks(int64_t n, int64_t grain, const Body& body) {
  if (n >= at::get_num_threads()) {
    at::parallel_for(0, n, grain, body);
  } else {
    body(0, n);
  }
}

}  // namespace

void fastfood_forward_cpu(const float* theta, int64_t d, float* out, int64_t D, int log_lb, uint64_t seed,
                          int generator) {
  const int64_t lb = int64_t{1} << log_lb;
  const int64_t nb = (D + lb - 1) / lb;
  const FeistelShape shape = feistel_shape(log_lb);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / lb);
  for_blocks(nb, grain, [&](int64_t begin, int64_t end) {
    BlockScratch s(lb, log_lb);
    float* x = s.x.data();
    float* y = s.y.data();
    for (int64_t j = begin; j < end; ++j) {
      const BlockKeys keys = block_keys(seed, static_cast<uint32_t>(j));
      fill_table(s.table.data(), keys.pi, shape, log_lb);
      at::parallel_for(0, lb, kElementGrain, [&](int64_t b, int64_t e) {
        signed_input(x, theta, d, keys.b, b, e, generator);
      });
      fwht_cpu_inplace(x, log_lb);
      const float scale = gaussians_and_scale(s.g.data(), keys, lb, D, generator);
      const uint16_t* table = s.table.data();
      const float* g = s.g.data();
      at::parallel_for(0, lb, kElementGrain, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          // Pi(k) < Lb: the Feistel network is a bijection of [0, 2^log_lb)
          y[k] = x[feistel_forward(static_cast<uint32_t>(k), keys.pi, shape, table)] * g[k];
        }
      });
      fwht_cpu_inplace(y, log_lb);
      const int64_t row0 = j * lb;
      const int64_t rows = std::min(lb, D - row0);
      for (int64_t k = 0; k < rows; ++k) out[row0 + k] = y[k] * scale;
    }
  });
}

void fastfood_backward_cpu(const float* grad, int64_t D, float* out, int64_t d, int log_lb, uint64_t seed,
                           int generator) {
  const int64_t lb = int64_t{1} << log_lb;
  const int64_t nb = (D + lb - 1) / lb;
  const FeistelShape shape = feistel_shape(log_lb);
  // a fixed split of the blocks into chunks, each summed into its own partial row, the rows then
  // summed in chunk order: the result does not depend on the number of threads
  const int64_t chunks = std::min<int64_t>(nb, 256);
  std::vector<float> partial(static_cast<size_t>(chunks * d), 0.f);
  for_blocks(chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    BlockScratch s(lb, log_lb);
    float* w = s.x.data();
    float* z = s.y.data();
    for (int64_t c = c_begin; c < c_end; ++c) {
      float* acc = partial.data() + c * d;
      for (int64_t j = c * nb / chunks; j < (c + 1) * nb / chunks; ++j) {
        const BlockKeys keys = block_keys(seed, static_cast<uint32_t>(j));
        fill_table(s.table.data(), keys.pi, shape, log_lb);
        const int64_t row0 = j * lb;
        const int64_t rows = std::min(lb, D - row0);
        std::copy(grad + row0, grad + row0 + rows, w);
        std::fill(w + rows, w + lb, 0.f);
        fwht_cpu_inplace(w, log_lb);
        const float scale = gaussians_and_scale(s.g.data(), keys, lb, D, generator);
        const uint16_t* table = s.table.data();
        const float* g = s.g.data();
        at::parallel_for(0, lb, kElementGrain, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) w[k] *= g[k];
        });
        at::parallel_for(0, lb, kElementGrain, [&](int64_t b, int64_t e) {
          for (int64_t m = b; m < e; ++m) z[m] = w[feistel_inverse(static_cast<uint32_t>(m), keys.pi, shape, table)];
        });
        fwht_cpu_inplace(z, log_lb);
        if (generator == kGeneratorV1) {
          for (int64_t m = 0; m < d; ++m) acc[m] += z[m] * sign(keys.b, static_cast<uint32_t>(m)) * scale;
        } else {
          uint32_t w = 0;
          for (int64_t m = 0; m < d; ++m) {
            if ((m & 31) == 0) w = sign_word_v2(keys.b, static_cast<uint32_t>(m));  // one word per 32
            acc[m] += z[m] * sign_bit(w, static_cast<uint32_t>(m & 31)) * scale;
          }
        }
      }
    }
  });
  for (int64_t m = 0; m < d; ++m) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * d + m];
    out[m] = static_cast<float>(sum);
  }
}

}  // namespace kron_kernels
