// fusednorm CUDA backend: the parameter structs, the variant flags and the launch heuristic.
//
// This header is shared by the kernels (*.cu, compiled by nvcc without torch headers, which keeps
// their compile time low) and by the host op layer (ops.cpp). Names follow the Python side:
// x, residual, residual_scale, h, y, mean, rstd, dy, dh_in, dx, dresidual, dweight, dbias, dscale.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fusednorm {

// ---------------------------------------------------------------------------------------------
// Variant flags. Each flag of the Triton kernel family (IS_RMS, HAS_RESIDUAL, SCALE_KIND,
// HAS_DROPOUT, STORE_H, HAS_WEIGHT, HAS_BIAS, READ_H, and the dtypes of residual/h/params) is a
// template parameter of the kernels' Variant. A flag is either fixed at compile time (kOff/kOn) or
// kRuntime: the kernel then reads the value from the params struct. Both read the same in the
// kernel (`V::has_weight(p)`); the dispatcher (dispatch.cuh) decides which flags are static.
// ---------------------------------------------------------------------------------------------
enum Mode : int { kOff = 0, kOn = 1, kRuntime = 2 };

// How the residual is scaled: h = residual * s + dropout(x).
enum ScaleKind : int {
  kScaleNone = 0,      // s = 1
  kScaleConstant = 1,  // s = scale_value, a Python float (DeepNorm's alpha), no gradient
  kScaleScalar = 2,    // s = residual_scale[()] (0-d tensor, learned)
  kScaleVector = 3,    // s = residual_scale[col] ((N,) tensor, learned)
  kScaleRuntime = -1,  // template value: read p.scale_kind at run time
};

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
// that CPU-only CI can test it). The reasoning:
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
  double dropout_scale = 1.0;   // 1 / (1 - p), rounded to the compute dtype in the kernel
  uint32_t keep_threshold = 0;  // keep = (philox_r0 >> 8) >= keep_threshold

  bool is_rms = false, has_residual = false, has_dropout = false, store_h = false;
  bool has_weight = false, has_bias = false;
  int scale_kind = kScaleNone;
  bool residual_f32 = false, h_f32 = false, weight_f32 = false, bias_f32 = false, scale_f32 = false;
  bool vectorized = false;  // every pointer and row stride allows 128-bit accesses

  LaunchConfig launch;
  int num_sms = 1;
};

struct BwdParams {
  const void* dy = nullptr;        // (M, N) x's dtype
  const void* dh_in = nullptr;     // (M, N) h's dtype, gradient flowing into the returned h
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
  double dropout_scale = 1.0;
  uint32_t keep_threshold = 0;

  bool is_rms = false, has_residual = false, has_dropout = false, read_h = false;
  bool has_weight = false, has_bias = false, has_dh_in = false, store_dresidual = false;
  int scale_kind = kScaleNone;
  bool residual_f32 = false, h_f32 = false, dh_in_f32 = false, weight_f32 = false, scale_f32 = false;
  bool vectorized = false;

  LaunchConfig launch;
  int num_sms = 1;
};

// Launchers, one explicit instantiation per x dtype (kernels_*.cu). T is __half, __nv_bfloat16,
// float or double. launch_fwd fills p.launch and launches on `stream`; launch_bwd with
// configure_only fills p.launch (its grid fixes the number of partial rows, which the caller
// allocates), else launches with p.launch. Both return the CUDA error of the launch.
template <typename T> cudaError_t launch_fwd(FwdParams& p, cudaStream_t stream);
template <typename T> cudaError_t launch_bwd(BwdParams& p, cudaStream_t stream, bool configure_only);
// Fixed-order sum over the partial rows: out[c] = sum_{r = 0..rows-1} partial[r, c], r in order.
// C (the compute dtype) is float or double; Out is the gradient's dtype.
template <typename C, typename Out>
cudaError_t launch_column_sum(const C* partial, int64_t rows, int64_t cols, Out* out, cudaStream_t stream);

}  // namespace fusednorm
