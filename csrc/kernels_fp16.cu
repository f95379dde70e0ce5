// Explicit instantiation of the kernel family for x of dtype __half (one file per dtype, so that
// the build compiles them in parallel).
#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace fusednorm {
template cudaError_t launch_fwd<__half>(FwdParams&, cudaStream_t);
template cudaError_t launch_bwd<__half>(BwdParams&, cudaStream_t, bool);
}  // namespace fusednorm
