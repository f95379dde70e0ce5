// Explicit instantiation of the kernel family for x of dtype double (one file per dtype, so that
// the build compiles them in parallel).
#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace fusednorm {
template cudaError_t launch_fwd<double>(FwdParams&, cudaStream_t);
template cudaError_t launch_bwd<double>(BwdParams&, cudaStream_t, bool);
template cudaError_t launch_column_sum<double, double>(const double*, int64_t, int64_t, double*, cudaStream_t);
template cudaError_t launch_column_sum<double, float>(const double*, int64_t, int64_t, float*, cudaStream_t);
}  // namespace fusednorm
