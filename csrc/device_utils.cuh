// Device helpers shared by the forward and backward kernels: dtype conversion, 128-bit group
// loads/stores with a scalar tail, the Philox dropout mask, and the row all-reduce.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fusednorm.h"
#include "philox.h"

namespace fusednorm {

// Block-shared arrays. __shared__ on the device; `static` when the kernels are compiled as host
// C++ by the CPU emulation of emulation/emulate.cpp (one block at a time, its threads as
// std::threads), where a function-local static is exactly "one array per running block".
#ifdef __CUDACC__
#define FUSEDNORM_SHARED __shared__
#else
#define FUSEDNORM_SHARED static
#endif

// Statistics and arithmetic in float32 for 16/32-bit x, float64 for float64 x (exact gradcheck).
template <typename T> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };

template <typename C, typename U>
__device__ __forceinline__ C to_compute(U v) {
  if constexpr (std::is_same_v<U, __half>) {
    return static_cast<C>(__half2float(v));
  } else if constexpr (std::is_same_v<U, __nv_bfloat16>) {
    return static_cast<C>(__bfloat162float(v));
  } else {
    return static_cast<C>(v);
  }
}

// Round to nearest even, like torch's .to(dtype).
template <typename U, typename C>
__device__ __forceinline__ U from_compute(C v) {
  if constexpr (std::is_same_v<U, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<U, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<U>(v);
  }
}

// G consecutive elements of U, aligned to their total size, so that one group of x is exactly one
// 128-bit access (and one group of a float32 tensor beside 16-bit x is two).
template <typename U, int G>
struct alignas(sizeof(U) * G) Pack {
  U v[G];
};

// Loads the G elements of `row` starting at `col` into out[] (compute dtype). The vectorized path
// needs the caller's proof of alignment (FwdParams::vectorized); the last, partial group of a row
// whose N is not a multiple of G (the tail) and unaligned tensors go element by element.
template <typename U, int G, typename C>
__device__ __forceinline__ void load_group(const U* row, int col, int cols, bool vectorized, C (&out)[G]) {
  if (vectorized && col + G <= cols) {
    const Pack<U, G> pack = *reinterpret_cast<const Pack<U, G>*>(row + col);
#pragma unroll
    for (int i = 0; i < G; ++i) out[i] = to_compute<C>(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) out[i] = col + i < cols ? to_compute<C>(row[col + i]) : C(0);
  }
}

// One 16-byte global store. Written as PTX (as CUDA's own __stcs/__stcg are): copying a Pack of
// __half / __nv_bfloat16 (user-provided assignment operators) compiled to 8 STG.E.U16 per group, and a
// uint4 copy of its bytes to 4 st.global.v2.u16 in the kernels (nvcc 13; a lone test kernel kept the
// v4). The "memory" clobber keeps later reads of the same row (the chunked forward re-reads h) after it.
__device__ __forceinline__ void store_16_bytes(void* dst, const uint4& words) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(words.x), "r"(words.y), "r"(words.z),
               "r"(words.w)
               : "memory");
#else
  *static_cast<uint4*>(dst) = words;  // the CPU emulation (tests/test_cuda_emulated.py)
#endif
}

// Stores a Pack (aligned to its size by the caller's proof, FwdParams::vectorized) in 16-byte words.
template <typename U, int G>
__device__ __forceinline__ void store_pack(U* dst, const Pack<U, G>& pack) {
  constexpr int kBytes = static_cast<int>(sizeof(Pack<U, G>));
  if constexpr (kBytes % 16 == 0) {
    uint4 words[kBytes / 16];
    memcpy(words, &pack, kBytes);
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) store_16_bytes(reinterpret_cast<uint4*>(dst) + k, words[k]);
  } else {
    *reinterpret_cast<Pack<U, G>*>(dst) = pack;
  }
}

template <typename U, int G, typename C>
__device__ __forceinline__ void store_group(U* row, int col, int cols, bool vectorized, const C (&in)[G]) {
  if (vectorized && col + G <= cols) {
    Pack<U, G> pack;
#pragma unroll
    for (int i = 0; i < G; ++i) pack.v[i] = from_compute<U>(in[i]);
    store_pack<U, G>(row + col, pack);
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) {
      if (col + i < cols) row[col + i] = from_compute<U>(in[i]);
    }
  }
}

// A tensor whose dtype is x's dtype T or float32, chosen by `f32` (a compile-time constant when
// the variant fixes it, else a uniform branch per group: the loads dominate, not the branch).
template <typename T>
struct Operand {
  const void* ptr;
  int64_t row_stride;
  bool f32;

  template <int G, typename C>
  __device__ __forceinline__ void load(int64_t row, int col, int cols, bool vectorized, C (&out)[G]) const {
    if (f32) {
      load_group<float, G>(static_cast<const float*>(ptr) + row * row_stride, col, cols, vectorized, out);
    } else {
      load_group<T, G>(static_cast<const T*>(ptr) + row * row_stride, col, cols, vectorized, out);
    }
  }
};

template <typename T>
struct OutOperand {
  void* ptr;
  int64_t row_stride;
  bool f32;

  template <int G, typename C>
  __device__ __forceinline__ void store(int64_t row, int col, int cols, bool vectorized,
                                        const C (&in)[G]) const {
    if (f32) {
      store_group<float, G>(static_cast<float*>(ptr) + row * row_stride, col, cols, vectorized, in);
    } else {
      store_group<T, G>(static_cast<T*>(ptr) + row * row_stride, col, cols, vectorized, in);
    }
  }
};

// A single element of a T-or-float32 tensor (the 0-d residual_scale).
template <typename T, typename C>
__device__ __forceinline__ C load_scalar(const void* ptr, bool f32) {
  return f32 ? to_compute<C>(*static_cast<const float*>(ptr)) : to_compute<C>(*static_cast<const T*>(ptr));
}

// Rounds v to the storage dtype (T or float32) and back: the statistics of a stored h are those of
// the rounded values the backward will read (DESIGN section 2).
template <typename T, typename C>
__device__ __forceinline__ C round_through(C v, bool f32) {
  return f32 ? to_compute<C>(from_compute<float>(v)) : to_compute<C>(from_compute<T>(v));
}

// ---------------------------------------------------------------------------------------------
// Row all-reduce of K values over the row group (threadIdx.x, one threadIdx.y per row): butterfly
// shuffles inside each warp (every lane ends with the same bits: each step adds the same two
// operands, only their order differs, and addition is commutative), then, for row groups of
// several warps, the per-warp sums through shared memory, added in warp order by every thread.
// Called by every thread of the block (it may __syncthreads), inactive rows included.
// ---------------------------------------------------------------------------------------------
template <typename C, int K>
__device__ __forceinline__ void row_allreduce(C (&v)[K], C* scratch /* >= 32 * K */) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return;
  const int warp = threadIdx.x >> 5;
  C* mine = scratch + threadIdx.y * warps_per_row * K;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) mine[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = C(0);
  for (int w = 0; w < warps_per_row; ++w) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += mine[w * K + k];
  }
  __syncthreads();  // scratch is reused by the next reduction
}

template <int M>
__device__ __forceinline__ bool flag(bool runtime_value) {
  if constexpr (M == kRuntime) {
    return runtime_value;
  } else {
    return M == kOn;
  }
}

// ---------------------------------------------------------------------------------------------
// Variant: the kernel family's template parameter. x's dtype T and the flags that change a kernel's
// passes, register arrays or Philox work: IS_RMS, HAS_RESIDUAL, HAS_DROPOUT (kOn/kOff) and STORE_H
// (kOn/kOff in the backward, which reads h or rebuilds it; kRuntime in the forward, where it is one
// uniform branch around the store of h). Every other fact is read from the params struct through
// the accessors below (csrc/README.md says why); for float32 x the "float32 or x's dtype" choices
// fold away.
// ---------------------------------------------------------------------------------------------
template <typename T_, int IsRms, int HasResidual, int HasDropout, int StoreH>
struct Variant {
  using T = T_;
  using C = typename ComputeOf<T>::type;
  static constexpr int kGroup = group_elems(sizeof(T));
  static constexpr int kFwdGroups = fwd_groups_per_thread(sizeof(T));
  static constexpr int kBwdGroups = bwd_groups_per_thread(sizeof(T));
  static_assert(kGroup * sizeof(T) == 16, "one group of x is one 128-bit access");
  static_assert(IsRms != kRuntime && HasResidual != kRuntime && HasDropout != kRuntime,
                "IS_RMS, HAS_RESIDUAL and HAS_DROPOUT change the kernel's passes: always static");

  static constexpr bool kIsRms = IsRms == kOn;
  static constexpr bool kHasResidual = HasResidual == kOn;
  static constexpr bool kHasDropout = HasDropout == kOn;
  static constexpr bool kStaticStoreH = StoreH != kRuntime;
  static constexpr bool kStoreH = StoreH == kOn;  // when kStaticStoreH
  static constexpr bool kXIsF32 = std::is_same_v<T, float>;

  template <typename P> __device__ static int scale_kind(const P& p) {
    if constexpr (kHasResidual) {
      return p.scale_kind;
    } else {
      return kScaleNone;
    }
  }
  template <typename P> __device__ static bool store_h(const P& p) { return flag<StoreH>(p.store_h); }
  template <typename P> __device__ static bool has_weight(const P& p) { return p.has_weight; }
  template <typename P> __device__ static bool has_bias(const P& p) { return p.has_bias; }
  template <typename P> __device__ static bool residual_f32(const P& p) { return !kXIsF32 && p.residual_f32; }
  template <typename P> __device__ static bool h_f32(const P& p) { return !kXIsF32 && p.h_f32; }
  template <typename P> __device__ static bool weight_f32(const P& p) { return !kXIsF32 && p.weight_f32; }
  __device__ static bool bias_f32(const FwdParams& p) { return !kXIsF32 && p.bias_f32; }
  template <typename P> __device__ static bool scale_f32(const P& p) { return !kXIsF32 && p.scale_f32; }
};

// ---------------------------------------------------------------------------------------------
// h = residual * s + dropout(x) for one group, in the compute dtype; shared by the forward and by
// the backward's recompute path, so both see the very same values. Columns >= cols give 0.
// ---------------------------------------------------------------------------------------------
template <typename V, typename P>
__device__ __forceinline__ void pre_norm_sum(const P& p, int64_t row, int col, uint64_t seed,
                                             typename V::C scale_scalar, typename V::C dropout_scale,
                                             typename V::C (&h)[V::kGroup]) {
  using T = typename V::T;
  using C = typename V::C;
  constexpr int G = V::kGroup;
  const int cols = static_cast<int>(p.cols);  // < 2^31 (checked on the host)
  load_group<T, G>(static_cast<const T*>(p.x) + row * p.x_row_stride, col, cols, p.vectorized, h);
  if constexpr (V::kHasDropout) {
#pragma unroll
    for (int i = 0; i < G; ++i) {
      // The logical index row * N + col, whatever the strides: the mask is a function of position.
      const uint64_t index = static_cast<uint64_t>(row * p.cols + col + i);
      // A product, not a select: NaN/Inf at a dropped position still poisons its row (as F.dropout).
      h[i] *= dropout_keep(seed, index, p.keep_threshold) ? dropout_scale : C(0);
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
      for (int i = 0; i < G; ++i) h[i] = r[i] * s[i] + h[i];
    } else if (kind != kScaleNone) {
#pragma unroll
      for (int i = 0; i < G; ++i) h[i] = r[i] * scale_scalar + h[i];
    } else {
#pragma unroll
      for (int i = 0; i < G; ++i) h[i] = r[i] + h[i];
    }
  }
}

// The scalar s of a constant or 0-d scale (1 otherwise); read once per thread.
template <typename V, typename P>
__device__ __forceinline__ typename V::C scalar_scale(const P& p) {
  using C = typename V::C;
  const int kind = V::scale_kind(p);
  if (kind == kScaleConstant) return static_cast<C>(p.scale_value);
  if (kind == kScaleScalar) return load_scalar<typename V::T, C>(p.residual_scale, V::scale_f32(p));
  return C(1);
}

// Turns a runtime bool into the constexpr Mode NAME (kOn/kOff) visible inside the lambda.
#define FUSEDNORM_BOOL_SWITCH(condition, NAME, ...) \
  [&] {                                             \
    if (condition) {                                \
      constexpr int NAME = kOn;                     \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr int NAME = kOff;                    \
      return __VA_ARGS__();                         \
    }                                               \
  }()


}  // namespace fusednorm
