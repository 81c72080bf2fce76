// Launchers of the CUDA kernels in kernels.cu: raw pointers and a stream, no torch headers, so
// that the .cu file compiles in seconds. The torch glue (checks, dtype dispatch, allocation)
// lives in ops_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace bagnet_fast {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// out[n, c] = mean over (h, w) of x[n, h, w, c]; x channels-last (N, H, W, C) contiguous.
cudaError_t spatial_mean(DType dtype, const void* x, void* out, int64_t batch, int64_t pixels,
                         int64_t channels, cudaStream_t stream);

// out[n, h, w, c] = act(y[n, h, w, c] + bias[c] + residual[n, h, w, c]) with the residual
// (N, Hr, Wr, C), Hr >= H, Wr >= W, cropped to the top-left; residual may be null.
// All channels-last contiguous; out may alias y.
cudaError_t bias_residual_act(DType dtype, const void* y, const void* bias, const void* residual,
                              void* out, int64_t batch, int64_t height, int64_t width,
                              int64_t channels, int64_t residual_height, int64_t residual_width,
                              bool relu, cudaStream_t stream);

}  // namespace cuda
}  // namespace bagnet_fast
