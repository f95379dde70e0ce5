// fusednorm CUDA backend: the variant's flag word and facts, the launch heuristic, the parameter structs.
//
// This header is shared by the kernels (*.cu, compiled by nvcc without torch headers, which keeps
// their compile time low), the host code that fills the structs (host.h, for ops.cpp and the CPU
// emulation). Names follow the Python side: x, residual, residual_scale, h, y, mean, rstd, dy, dh_in,
// dx, dresidual, dweight, dbias, dscale, weight_offset, dropout_scale, keep_threshold.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "philox.h"

namespace fusednorm {

// ---------------------------------------------------------------------------------------------
// The variant: fusednorm.variant.Variant's flag word (its FLAG_BITS, bit for bit) and the facts that
// follow from it, written here once for the C++ side. tests/test_cuda_host.py checks every word
// against the Python properties (torch.ops.fusednorm.cuda_variant_facts and the CPU emulation).
// ---------------------------------------------------------------------------------------------
// How the residual is scaled: h = residual * s + dropout(x) (Python: ScaleKind).
enum ScaleKind : int {
  kScaleNone = 0,      // s = 1
  kScaleConstant = 1,  // s = scale_value, a Python float (DeepNorm's alpha), no gradient
  kScaleScalar = 2,    // s = residual_scale[()] (0-d tensor, learned)
  kScaleVector = 3,    // s = residual_scale[col] ((N,) tensor, learned)
};

constexpr int64_t kFlagIsRms = int64_t(1) << 0;
constexpr int64_t kFlagHasResidual = int64_t(1) << 1;
constexpr int kFlagScaleKindShift = 2;  // two bits: the ScaleKind
constexpr int64_t kFlagScaleKind = int64_t(3) << kFlagScaleKindShift;
constexpr int64_t kFlagHasDropout = int64_t(1) << 4;
constexpr int64_t kFlagPrenorm = int64_t(1) << 5;
constexpr int64_t kFlagResidualF32 = int64_t(1) << 6;  // residual is float32 and x is not
constexpr int64_t kFlagHF32 = int64_t(1) << 7;         // the stored h is float32 and x is not
constexpr int64_t kFlagHasWeight = int64_t(1) << 8;
constexpr int64_t kFlagHasBias = int64_t(1) << 9;
constexpr int64_t kFlagStoreStats = int64_t(1) << 10;  // telemetry: the forward writes the row statistics
constexpr int64_t kFlagsKnown = kFlagIsRms | kFlagHasResidual | kFlagScaleKind | kFlagHasDropout | kFlagPrenorm |
                                kFlagResidualF32 | kFlagHF32 | kFlagHasWeight | kFlagHasBias | kFlagStoreStats;
// Columns of the row statistics (fusednorm.backends.contract.STATS_COLUMNS; row_stats.cuh).
constexpr int kStatsWidth = 8;

// Element types of the tensors the host code describes (host.h: TensorView); the values are the
// codes the CPU emulation's callers use too (tests/_cuda_emulation.py).
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3, kInt64 = 4 };

constexpr int dtype_bytes(DType t) { return t == kFloat16 || t == kBFloat16 ? 2 : t == kFloat32 ? 4 : 8; }
// Statistics and arithmetic in float32, float64 for float64 x (so that gradcheck is exact).
constexpr DType compute_dtype(DType x) { return x == kFloat64 ? kFloat64 : kFloat32; }

struct VariantFlags {
  bool is_rms = false;
  bool has_residual = false;
  int scale_kind = kScaleNone;
  bool has_dropout = false;
  bool prenorm = false;  // the caller gets h too: (y, h)
  bool residual_f32 = false;
  bool h_f32 = false;
  bool has_weight = false;
  bool has_bias = false;
  bool store_stats = false;  // forward only: the backward of a monitored call is the same

  static constexpr VariantFlags decode(int64_t word) {
    VariantFlags v;
    v.is_rms = word & kFlagIsRms;
    v.has_residual = word & kFlagHasResidual;
    v.scale_kind = static_cast<int>((word & kFlagScaleKind) >> kFlagScaleKindShift);
    v.has_dropout = word & kFlagHasDropout;
    v.prenorm = word & kFlagPrenorm;
    v.residual_f32 = word & kFlagResidualF32;
    v.h_f32 = word & kFlagHF32;
    v.has_weight = word & kFlagHasWeight;
    v.has_bias = word & kFlagHasBias;
    v.store_stats = word & kFlagStoreStats;
    return v;
  }

  // The scale is a tensor that gets a gradient (Admin).
  constexpr bool learned_scale() const { return scale_kind == kScaleScalar || scale_kind == kScaleVector; }
  // The forward writes h and the backward reads it: when the caller gets h (Pre-LN), or when there is a
  // residual and no learned scale (then the backward reads dy and h instead of dy, x and residual).
  constexpr bool store_h() const { return prenorm || (has_residual && !learned_scale()); }
  // dresidual equals dx element for element (same dtype, s = 1, no dropout): written once, as dx.
  constexpr bool dresidual_is_dx() const {
    return has_residual && scale_kind == kScaleNone && !has_dropout && !residual_f32;
  }
  constexpr bool store_dresidual() const { return has_residual && !dresidual_is_dx(); }
  constexpr DType residual_dtype(DType x) const { return residual_f32 ? kFloat32 : x; }  // with has_residual
  constexpr DType h_dtype(DType x) const { return h_f32 ? kFloat32 : x; }
};

// nullptr when `word` is the flag word of a Variant, else why not (Variant.from_flags and
// Variant.__post_init__ reject the same words).
inline const char* why_not_a_variant(int64_t word) {
  if (word < 0 || (word & ~kFlagsKnown) != 0) return "unknown bits set";
  const VariantFlags v = VariantFlags::decode(word);
  if (!v.has_residual && (v.scale_kind != kScaleNone || v.residual_f32)) {
    return "a residual scale or dtype needs a residual";
  }
  if (v.is_rms && v.has_bias) return "RMSNorm has no bias";
  if (v.h_f32 && !v.store_h()) return "h_f32 describes a stored h, but this variant does not store h";
  if (v.residual_f32 && v.store_h() && !v.h_f32) return "a stored h keeps the float32 residual stream's dtype";
  return nullptr;
}

// The dropout threshold of fusednorm.dropout.keep_threshold: round(p * 2^24), ties to even (as
// Python's round), so that keep = (philox_r0 >> 8) >= threshold agrees with every backend. p in [0, 1).
inline uint32_t keep_threshold(double dropout_p) {
  const double scaled = dropout_p * double(uint32_t(1) << kKeepBits);  // exact: times a power of two
  double whole = std::floor(scaled);
  const double rest = scaled - whole;  // exact: both are below 2^24
  if (rest > 0.5 || (rest == 0.5 && std::fmod(whole, 2.0) != 0.0)) whole += 1.0;
  return static_cast<uint32_t>(whole);
}

// Template flags of the kernels' Variant (device_utils.cuh): fixed at compile time (kOff/kOn), or
// kRuntime: read from the params struct. Only the forward's STORE_H is kRuntime (see csrc/README.md).
enum Mode : int { kOff = 0, kOn = 1, kRuntime = 2 };

// The largest row group: 512 threads, so that __launch_bounds__(512) leaves 128 registers per
// thread for the row held in registers (1024 threads would cap it at 64 and spill).
constexpr int kMaxThreads = 512;
constexpr int kMaxThreadsPerRow = 512;
// Threads per block that the heuristic aims for when one row needs fewer (several rows per block).
constexpr int kTargetBlockThreads = 128;

// Elements per 128-bit access of the input dtype x (8 for 16-bit, 4 for float32, 2 for float64).
constexpr int group_elems(int elem_bytes) { return 16 / elem_bytes; }
// Groups each thread keeps in registers per chunk of a row. The forward keeps one array (h), the
// backward two (xhat, g) plus three column-partial accumulators, hence fewer groups for 16-bit x
// (8 elements per group) than for 32/64-bit x.
constexpr int fwd_groups_per_thread(int /*elem_bytes*/) { return 4; }
constexpr int bwd_groups_per_thread(int elem_bytes) { return elem_bytes == 2 ? 2 : 4; }

// ---------------------------------------------------------------------------------------------
// Launch configuration. Pure host code (also exposed as torch.ops.fusednorm.cuda_launch_config so
// that CPU-only CI can test it; its Python mirror is fusednorm.backends.cuda_impl.LaunchConfig). The
// block shape depends on the row only (choose_block, host.h fills it into the params); the forward's
// grid also on the device's occupancy (choose_grid, in the launchers), the backward's on the problem
// only (backward_grid). The
// reasoning:
// - a row is processed by a row group of threads_per_row threads (a power of two, 32..512); each
//   thread holds groups_per_thread 128-bit groups of the row in registers, so a row of up to
//   chunk_cols = threads_per_row * groups_per_thread * group_elems elements is read from memory
//   once (row_fits). Wider rows (e.g. N = 65536) are processed in chunks of chunk_cols, re-read
//   from L2 in each pass instead of being rejected or spilled.
// - threads_per_row is the smallest power of two whose registers hold the row: fewer threads per
//   row means fewer cross-warp reductions (shared memory + __syncthreads) and more rows per block.
// - small rows share a block (rows_per_block) so blocks have ~128 threads.
// - the backward's column partials live in shared memory (LaunchConfig::smem_bytes, at most
//   3 slots * 512 threads * 16 elements * 4 bytes = 96 KiB per block), not in registers, which hold
//   the row's xhat and g.
// - the forward grid covers every row group once (capped; the kernel loops over rows), sized by the
//   device's SMs and occupancy: rows are independent there, so the grid changes no bit.
// - the backward's grid fixes its row partition: each (block, row group) writes one float32 partial row
//   of the column sums, and column_sum_kernel adds them in a fixed order. So that dweight, dbias and
//   dscale have the same bits on every GPU (DESIGN section 2), that grid is a pure function of (rows,
//   cols, dtype, partial slots): two waves of a reference chip of kReferenceSms SMs (H100/H200 SXM) at
//   the occupancy the block shape allows with up to 128 registers per thread (__launch_bounds__(512, 1))
//   and its shared memory -- never the device's SM count or measured occupancy. A chip with other SM
//   counts runs the same blocks in its own waves (108 SMs: 2.4 waves of work in 3).
// ---------------------------------------------------------------------------------------------
struct LaunchConfig {
  int threads_per_row = 32;
  int rows_per_block = 1;
  int groups_per_thread = 1;
  int64_t chunk_cols = 0;   // columns one pass of the row group covers
  bool row_fits = true;     // cols <= chunk_cols: the row stays in registers between passes
  int64_t grid = 1;         // blocks
  int64_t smem_bytes = 0;   // dynamic shared memory per block (the backward's column partials)
};

constexpr int kReferenceSms = 132;
constexpr int kBackwardWaves = 2;
// sm_90 limits the reference occupancy is computed with.
constexpr int kSmThreads = 2048, kSmRegisters = 65536, kMaxRegistersPerThread = 128;
constexpr int64_t kSmSharedBytes = 228 * 1024, kBlockReservedSharedBytes = 1024;

// The backward keeps `partial_slots` column-partial accumulators (dweight, dbias, dscale: 0..3) for
// one chunk of each row group in shared memory, in the compute dtype (float64 for float64 x).
inline LaunchConfig choose_block(int64_t cols, int elem_bytes, bool backward, int partial_slots = 0) {
  LaunchConfig c;
  const int group = group_elems(elem_bytes);
  c.groups_per_thread = backward ? bwd_groups_per_thread(elem_bytes) : fwd_groups_per_thread(elem_bytes);
  const int64_t groups = (cols + group - 1) / group;
  int tpr = 32;
  while (tpr < kMaxThreadsPerRow && int64_t(tpr) * c.groups_per_thread < groups) tpr *= 2;
  c.threads_per_row = tpr;
  c.rows_per_block = tpr >= kTargetBlockThreads ? 1 : kTargetBlockThreads / tpr;
  c.chunk_cols = int64_t(tpr) * c.groups_per_thread * group;
  c.row_fits = cols <= c.chunk_cols;
  const int compute_bytes = elem_bytes == 8 ? 8 : 4;
  c.smem_bytes = backward ? int64_t(partial_slots) * c.rows_per_block * c.chunk_cols * compute_bytes : 0;
  return c;
}

// The forward: blocks_per_sm is the occupancy of the chosen block size on this device
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor).
inline int64_t choose_grid(int64_t rows, int rows_per_block, int num_sms, int blocks_per_sm) {
  const int64_t needed = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t wave = int64_t(num_sms > 0 ? num_sms : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  // The forward loops over rows too; 32 waves bounds the grid without costing parallelism.
  const int64_t cap = wave * 32;
  const int64_t grid = needed < cap ? needed : cap;
  return grid > 0 ? grid : 1;
}

// Blocks of this shape that fit one reference SM: threads, registers (the launch bounds' worst case)
// and shared memory (the backward's partials).
inline int64_t reference_blocks_per_sm(const LaunchConfig& c) {
  const int64_t threads = int64_t(c.threads_per_row) * c.rows_per_block;
  int64_t blocks = kSmThreads / threads;
  const int64_t by_registers = kSmRegisters / (threads * kMaxRegistersPerThread);
  const int64_t by_smem = kSmSharedBytes / (c.smem_bytes + kBlockReservedSharedBytes);
  blocks = blocks < by_registers ? blocks : by_registers;
  blocks = blocks < by_smem ? blocks : by_smem;
  return blocks > 1 ? blocks : 1;
}

// The backward: a pure function of the problem and the block shape (see above), whatever the device.
inline int64_t backward_grid(int64_t rows, const LaunchConfig& c) {
  const int64_t needed = (rows + c.rows_per_block - 1) / c.rows_per_block;
  const int64_t cap = int64_t(kBackwardWaves) * kReferenceSms * reference_blocks_per_sm(c);
  const int64_t grid = needed < cap ? needed : cap;
  return grid > 0 ? grid : 1;
}

// num_sms and blocks_per_sm size the forward's grid only.
inline LaunchConfig choose_launch(int64_t rows, int64_t cols, int elem_bytes, int num_sms, int blocks_per_sm,
                                  bool backward, int partial_slots = 0) {
  LaunchConfig c = choose_block(cols, elem_bytes, backward, partial_slots);
  c.grid = backward ? backward_grid(rows, c) : choose_grid(rows, c.rows_per_block, num_sms, blocks_per_sm);
  return c;
}

// ---------------------------------------------------------------------------------------------
// Parameter structs: plain data, passed by value to the kernels. Tensors of "x's dtype or
// float32" carry an *_f32 flag. Row strides are in elements (the last dimension is contiguous).
// ---------------------------------------------------------------------------------------------
struct FwdParams {
  const void* x = nullptr;
  const void* residual = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* residual_scale = nullptr;  // 0-d or (N,) tensor; nullptr for none/constant
  const int64_t* seed = nullptr;         // (1,) int64 on the device; read by the kernel (no host sync)
  void* y = nullptr;                     // (M, N) x's dtype, contiguous
  void* h = nullptr;                     // (M, N) h's dtype, contiguous, when store_h
  void* mean = nullptr;                  // (M,) compute dtype, LayerNorm only
  void* rstd = nullptr;                  // (M,) compute dtype

  int64_t rows = 0, cols = 0;
  int64_t x_row_stride = 0, residual_row_stride = 0;
  double eps = 0.0;
  double scale_value = 1.0;
  double weight_offset = 0.0;   // the affine weight is (weight + weight_offset), summed in the compute dtype
  double dropout_scale = 1.0;   // 1 / (1 - p), rounded to the compute dtype in the kernel
  uint32_t keep_threshold = 0;  // keep = (philox_r0 >> 8) >= keep_threshold

  bool is_rms = false, has_residual = false, has_dropout = false, store_h = false;
  bool has_weight = false, has_bias = false;
  int scale_kind = kScaleNone;
  bool residual_f32 = false, h_f32 = false, weight_f32 = false, bias_f32 = false, scale_f32 = false;
  bool vectorized = false;  // every pointer and row stride allows 128-bit accesses

  LaunchConfig launch;
  int num_sms = 1;

  // Telemetry (last, so that the other fields keep their offsets in the kernels' parameter space).
  bool store_stats = false;
  void* stats = nullptr;  // (M, kStatsWidth) float32, when store_stats
};

struct BwdParams {
  const void* dy = nullptr;        // (M, N) x's dtype
  const void* dh_in = nullptr;     // (M, N) x's dtype or float32, gradient flowing into the returned h
  const void* x = nullptr;         // read when h is recomputed
  const void* residual = nullptr;  // read to recompute h and for dscale
  const void* h = nullptr;         // read when the forward stored h
  const void* weight = nullptr;
  const void* residual_scale = nullptr;
  const void* mean = nullptr;      // (M,) compute dtype, LayerNorm only
  const void* rstd = nullptr;      // (M,) compute dtype
  const int64_t* seed = nullptr;
  void* dx = nullptr;              // (M, N) x's dtype
  void* dresidual = nullptr;       // (M, N) residual's dtype, when store_dresidual
  // Per-(block, row group) partial column sums, (partial_rows, N) in the compute dtype.
  void* dweight_partial = nullptr;
  void* dbias_partial = nullptr;
  void* dscale_partial = nullptr;

  int64_t rows = 0, cols = 0;
  int64_t dy_row_stride = 0, dh_in_row_stride = 0, x_row_stride = 0, residual_row_stride = 0, h_row_stride = 0;
  double scale_value = 1.0;
  double weight_offset = 0.0;
  double dropout_scale = 1.0;
  uint32_t keep_threshold = 0;

  // store_h: h is read (the forward stored it), else rebuilt from x and residual. has_bias: dbias is
  // wanted. has_dh_in: a gradient flows into the returned h (a fact of the call, not of the variant).
  bool is_rms = false, has_residual = false, has_dropout = false, store_h = false;
  bool has_weight = false, has_bias = false, has_dh_in = false, store_dresidual = false;
  int scale_kind = kScaleNone;
  bool residual_f32 = false, h_f32 = false, dh_in_f32 = false, weight_f32 = false, scale_f32 = false;
  bool vectorized = false;

  LaunchConfig launch;
  int num_sms = 1;
};

// Launchers, one explicit instantiation per x dtype (kernels_*.cu). T is __half, __nv_bfloat16,
// float or double. p.launch holds the block shape (host.h). launch_fwd sets p.launch.grid from the
// kernel's occupancy and launches on `stream`; launch_bwd with configure_only sets p.launch.grid (it
// fixes the number of partial rows, which the caller allocates), else launches with p.launch. Both
// return the CUDA error of the launch.
template <typename T> cudaError_t launch_fwd(FwdParams& p, cudaStream_t stream);
template <typename T> cudaError_t launch_bwd(BwdParams& p, cudaStream_t stream, bool configure_only);
// Fixed-order sum over the partial rows: out[c] = sum_{r = 0..rows-1} partial[r, c], r in order.
// C (the compute dtype) is float or double; Out is the gradient's dtype.
template <typename C, typename Out>
cudaError_t launch_column_sum(const C* partial, int64_t rows, int64_t cols, Out* out, cudaStream_t stream);

}  // namespace fusednorm
