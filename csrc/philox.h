// Philox4x32-10 dropout mask, exactly as fusednorm/dropout.py defines it. Host and device: the
// kernels use it, and ops.cpp exposes the host version (torch.ops.fusednorm.cuda_philox_r0) so
// that CPU-only CI checks it bit for bit against the Python definition.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FUSEDNORM_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define FUSEDNORM_HOST_DEVICE_INLINE inline
#endif

namespace fusednorm {

// ---------------------------------------------------------------------------------------------
// Philox4x32-10, first output word, exactly as fusednorm/dropout.py defines it:
// counter = (idx_lo, idx_hi, 0, 0), key = (seed_lo, seed_hi).
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kKeepBits = 24;

FUSEDNORM_HOST_DEVICE_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FUSEDNORM_HOST_DEVICE_INLINE uint32_t philox_r0(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Integer comparison, so every backend agrees bit for bit (no float conversion of the draw).
FUSEDNORM_HOST_DEVICE_INLINE bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return (philox_r0(seed, index) >> (32 - kKeepBits)) >= threshold;
}

}  // namespace fusednorm
