// Explicit instantiation of the kernel family for x of dtype float (one file per dtype, so that
// the build compiles them in parallel).
#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace fusednorm {
template cudaError_t launch_fwd<float>(FwdParams&, cudaStream_t);
template cudaError_t launch_bwd<float>(BwdParams&, cudaStream_t, bool);
template cudaError_t launch_column_sum<float, float>(const float*, int64_t, int64_t, float*, cudaStream_t);
template cudaError_t launch_column_sum<float, __half>(const float*, int64_t, int64_t, __half*, cudaStream_t);
template cudaError_t launch_column_sum<float, __nv_bfloat16>(const float*, int64_t, int64_t, __nv_bfloat16*,
                                                              cudaStream_t);
}  // namespace fusednorm
