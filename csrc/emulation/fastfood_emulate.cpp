// Runs the CUDA Fastfood kernels of fastfood_cuda.cuh on the host (cuda_host.h) for the tests:
//   fastfood_emulate fwd LOG_LB D SEED GRID THETA_FILE OUT_FILE [GENERATOR]     out (D,) = P theta
//   fastfood_emulate bwd LOG_LB D SEED GRID GRAD_FILE PARTIAL_FILE [GENERATOR]  partial (GRID * R, Lb)
//   fastfood_emulate banks                                           the exchange's bank check
// Files are raw little-endian float32; theta's length is its file size / 4. GRID is the number
// of persistent CTAs (fewer than the blocks: each CTA then walks several). GENERATOR: the generator
// version, 1 (default) or 2.
#include "cuda_host.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../fastfood_cuda.cuh"

namespace kron_kernels {
namespace device {
float4 smem_words[(256 * 1024) / sizeof(float4)];  // the CTA's dynamic shared memory (one CTA at a time)
}  // namespace device
}  // namespace kron_kernels

namespace {

using namespace kron_kernels::device;

std::vector<float> read_floats(const char* path) {
  std::vector<float> v;
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) std::exit(3);
  float x;
  while (std::fread(&x, sizeof(x), 1, f) == 1) v.push_back(x);
  std::fclose(f);
  return v;
}

void write_floats(const char* path, const std::vector<float>& v) {
  FILE* f = std::fopen(path, "wb");
  if (f == nullptr || std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) std::exit(4);
  std::fclose(f);
}

template <int kLogN, int kGen>
int run(bool forward, int64_t D, uint64_t seed, unsigned grid, const char* in_path, const char* out_path) {
  using C = RowConfig<kLogN>;
  static_assert(FastfoodConfig<kLogN>::kSmemBytes <= static_cast<int>(sizeof(smem_words)), "emulated shared memory");
  const std::vector<float> in = read_floats(in_path);
  const int64_t nb = (D + C::kN - 1) / C::kN;
  const float inv_sqrt_D = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  std::vector<float> out;
  if (forward) {
    out.assign(D, NAN);
    kk_emulation::launch(grid, C::kThreads, [&] {
      fastfood_forward_kernel<kLogN, kGen>(in.data(), static_cast<int64_t>(in.size()), out.data(), D, nb, seed, inv_sqrt_D);
    });
  } else {
    out.assign(static_cast<size_t>(grid) * C::kRowsPerBlock * C::kN, NAN);
    kk_emulation::launch(grid, C::kThreads, [&] {
      fastfood_backward_kernel<kLogN, kGen>(in.data(), D, out.data(), nb, seed, inv_sqrt_D);
    });
  }
  write_floats(out_path, out);
  return 0;
}

}  // namespace

// fwht_row_registers' shared-memory exchange (kE = 8 floats per row: every row that spans
// warps has 8-element thread vectors), for 2, 4 and 8 warps per row: each warp-wide access --
// the row-major stores and loads (row t = w * 32 + l, column e) and the transposed ones (row
// e_lo * 32 + l, column (e_hi << log2 kWarps) | w) -- touches 32 distinct banks, and each row
// keeps its own 8 slots. Prints the first violation and returns 1, else prints "ok".
int check_banks() {
  constexpr int kE = 8;
  for (int warps = 2; warps <= 8; warps *= 2) {
    const int log_warps = warps == 8 ? 3 : warps == 4 ? 2 : 1;
    for (int row = 0; row < warps * 32; ++row) {
      bool seen[kE] = {};
      for (int col = 0; col < kE; ++col) {
        const int slot = exchange_slot<kE>(row, col);
        if (slot / kE != row || seen[slot % kE]) {
          std::printf("row %d col %d -> slot %d: not a permutation of the row's slots\n", row, col, slot);
          return 1;
        }
        seen[slot % kE] = true;
      }
    }
    for (int w = 0; w < warps; ++w) {
      for (int e = 0; e < kE; ++e) {
        const int e_lo = e & (warps - 1), e_hi = e >> log_warps;
        uint32_t row_major = 0, transposed = 0;  // bank bitmasks of the warp's 32 accesses
        for (int l = 0; l < 32; ++l) {
          row_major |= 1u << (exchange_slot<kE>(w * 32 + l, e) % 32);
          transposed |= 1u << (exchange_slot<kE>(e_lo * 32 + l, (e_hi << log_warps) | w) % 32);
        }
        if (row_major != 0xffffffffu || transposed != 0xffffffffu) {
          std::printf("%d warps, warp %d, element %d: bank conflict (banks %08x / %08x)\n", warps, w, e,
                      row_major, transposed);
          return 1;
        }
      }
    }
  }
  std::printf("ok\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "banks") return check_banks();
  if (argc != 8 && argc != 9) return 2;
  const int generator = argc == 9 ? std::atoi(argv[8]) : 1;
  if (generator != 1 && generator != 2) return 2;
  const bool forward = std::string(argv[1]) == "fwd";
  const int log_lb = std::atoi(argv[2]);
  const int64_t D = std::atoll(argv[3]);
  const uint64_t seed = std::strtoull(argv[4], nullptr, 10);
  const unsigned grid = static_cast<unsigned>(std::atoi(argv[5]));
  switch (log_lb) {
#define KK_CASE(K) \
  case K:          \
    return generator == 1 ? run<K, 1>(forward, D, seed, grid, argv[6], argv[7]) \
                          : run<K, 2>(forward, D, seed, grid, argv[6], argv[7]);
    KK_CASE(0) KK_CASE(1) KK_CASE(2) KK_CASE(3) KK_CASE(4) KK_CASE(5) KK_CASE(6) KK_CASE(7) KK_CASE(8)
    KK_CASE(9) KK_CASE(10) KK_CASE(11) KK_CASE(12) KK_CASE(13) KK_CASE(14) KK_CASE(15)
#undef KK_CASE
    default:
      return 2;
  }
}
