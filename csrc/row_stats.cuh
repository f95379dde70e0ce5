// The forward's optional row statistics (telemetry, DESIGN section 7): fwd_kernel<V, kOn> writes per row
// the kStatsWidth float32 columns of fusednorm.backends.contract.STATS_COLUMNS:
//
//   mean and M2 = sum((v - mean)^2) of the branch f = dropout(x), of the stream residual * s (0 without a
//   residual) and of h (the rounded stored h when the variant stores h), max|h| (NaN ignored), and the
//   number of non-finite h values.
//
// Each thread folds the groups it loads in the first pass into its own (count, mean, M2) with Chan's
// update (never E[v^2] - E[v]^2); the row group then merges the threads' moments exactly:
// mean = sum(count_t * mean_t) / N, M2 = sum(M2_t + count_t * (mean_t - mean)^2), two sum all-reduces.
// Nothing of (M, N) size is read twice for it. fwd_kernel<V, kOff> contains none of this code.
#pragma once

#include <limits>

#include "device_utils.cuh"

namespace fusednorm {

// (count, mean, M2) of the values one thread has seen.
template <typename C>
struct Moments {
  C count = C(0), mean = C(0), m2 = C(0);

  // Folds in the first `valid` values of one group (two-pass inside the group, then Chan's merge).
  template <int G>
  __device__ __forceinline__ void add(const C (&v)[G], int valid) {
    C sum = C(0);
#pragma unroll
    for (int i = 0; i < G; ++i) sum += i < valid ? v[i] : C(0);
    const C n = static_cast<C>(valid);
    const C group_mean = sum / n;
    C group_m2 = C(0);
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const C d = v[i] - group_mean;
      group_m2 += i < valid ? d * d : C(0);
    }
    const C total = count + n;
    const C delta = group_mean - mean;
    mean += delta * (n / total);
    m2 += group_m2 + delta * delta * (count * n / total);
    count = total;
  }
};

template <typename C>
struct RowStats {
  Moments<C> branch, stream, h;
  C largest = C(0);    // max |h|, NaN ignored
  C nonfinite = C(0);  // how many h values are NaN or +-Inf

  // kHasStream: the variant has a residual (without one the stream's moments stay 0, in no register).
  template <bool kHasStream, int G>
  __device__ __forceinline__ void add(const C (&f)[G], const C (&rs)[G], const C (&hv)[G], int valid) {
    branch.add(f, valid);
    if constexpr (kHasStream) stream.add(rs, valid);
    h.add(hv, valid);
#pragma unroll
    for (int i = 0; i < G; ++i) {
      if (i >= valid) continue;
      const C magnitude = hv[i] < C(0) ? -hv[i] : hv[i];
      if (magnitude > largest) largest = magnitude;  // false for NaN
      if (!(magnitude < std::numeric_limits<C>::infinity())) nonfinite += C(1);
    }
  }
};

// f = dropout(x), rs = residual * s and h = rs + f for one group, in the compute dtype (0 past the row's
// end). h is computed with pre_norm_sum's very expressions, so y does not depend on the flag.
template <typename V, typename P>
__device__ __forceinline__ void pre_norm_parts(const P& p, int64_t row, int col, uint64_t seed,
                                               typename V::C scale_scalar, typename V::C dropout_scale,
                                               typename V::C (&h)[V::kGroup], typename V::C (&f)[V::kGroup],
                                               typename V::C (&rs)[V::kGroup]) {
  using T = typename V::T;
  using C = typename V::C;
  constexpr int G = V::kGroup;
  const int cols = static_cast<int>(p.cols);
  load_group<T, G>(static_cast<const T*>(p.x) + row * p.x_row_stride, col, cols, p.vectorized, f);
  if constexpr (V::kHasDropout) {
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const uint64_t index = static_cast<uint64_t>(row * p.cols + col + i);
      f[i] *= dropout_keep(seed, index, p.keep_threshold) ? dropout_scale : C(0);
    }
  }
  if constexpr (V::kHasResidual) {
    C r[G];
    const Operand<T> residual{p.residual, p.residual_row_stride, V::residual_f32(p)};
    residual.template load<G>(row, col, cols, p.vectorized, r);
    const int kind = V::scale_kind(p);
    if (kind == kScaleVector) {
      C s[G];
      const Operand<T> scale{p.residual_scale, 0, V::scale_f32(p)};
      scale.template load<G>(0, col, cols, p.vectorized, s);
#pragma unroll
      for (int i = 0; i < G; ++i) {
        rs[i] = r[i] * s[i];
        h[i] = r[i] * s[i] + f[i];
      }
    } else if (kind != kScaleNone) {
#pragma unroll
      for (int i = 0; i < G; ++i) {
        rs[i] = r[i] * scale_scalar;
        h[i] = r[i] * scale_scalar + f[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < G; ++i) {
        rs[i] = r[i];
        h[i] = r[i] + f[i];
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) {
      rs[i] = C(0);
      h[i] = f[i];
    }
  }
}

// Max over the row group (threadIdx.x), the pattern of row_allreduce; v is never NaN here.
template <typename C>
__device__ __forceinline__ C row_allreduce_max(C v, C* scratch /* >= 32 */) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const C other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return v;
  const int warp = threadIdx.x >> 5;
  C* mine = scratch + threadIdx.y * warps_per_row;
  if ((threadIdx.x & 31) == 0) mine[warp] = v;
  __syncthreads();
  for (int w = 0; w < warps_per_row; ++w) v = mine[w] > v ? mine[w] : v;
  __syncthreads();
  return v;
}

// Merges the threads' statistics of one row and writes them (thread 0 of an active row). Called by
// every thread of the block, inactive rows included (it synchronizes the block).
template <typename C>
__device__ __forceinline__ void store_row_stats(const RowStats<C>& s, int64_t row, bool active, int64_t cols,
                                                float* stats) {
  // 16 warps per block at most (kMaxThreads), 4 values per warp.
  FUSEDNORM_SHARED C stats_scratch[kMaxThreads / 32 * 4];
  C sums[4] = {s.branch.count * s.branch.mean, s.stream.count * s.stream.mean, s.h.count * s.h.mean, s.nonfinite};
  row_allreduce(sums, stats_scratch);
  const C n = static_cast<C>(cols);
  const C mean[3] = {sums[0] / n, sums[1] / n, sums[2] / n};
  const Moments<C>* parts[3] = {&s.branch, &s.stream, &s.h};
  C m2[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const C d = parts[k]->mean - mean[k];
    m2[k] = parts[k]->m2 + parts[k]->count * d * d;
  }
  row_allreduce(m2, stats_scratch);
  const C largest = row_allreduce_max(s.largest, stats_scratch);
  if (!active || threadIdx.x != 0) return;
  const C out[kStatsWidth] = {mean[0], m2[0], mean[1], m2[1], mean[2], m2[2], largest, sums[3]};
#pragma unroll
  for (int k = 0; k < kStatsWidth; ++k) stats[row * kStatsWidth + k] = static_cast<float>(out[k]);
}

}  // namespace fusednorm
