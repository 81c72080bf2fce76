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

// out[n, h, w, c] = act(y[n, h, w, c] + bias[c] + residual[n, h, w, c]).
// y and out: channels-last (N, H, W, C) contiguous; residual (may be null): any (N, >=H, >=W, C)
// array with unit channel stride, read at element n * residual_strides[0] + h *
// residual_strides[1] + w * residual_strides[2] + c (a top-left crop is just a strided view).
// out may alias y, or the residual when that has out's layout (an in-place residual block).
cudaError_t bias_residual_act(DType dtype, const void* y, const void* bias, const void* residual,
                              void* out, int64_t batch, int64_t height, int64_t width,
                              int64_t channels, const int64_t residual_strides[3], bool relu,
                              cudaStream_t stream);

// out = x * scale[c] + shift[c] (== (x / 255 - mean[c]) / std[c]), zero padded.
struct PreprocessAffine {
  float scale[3];
  float shift[3];
};

// uint8 images (N, 3, H, W) read at n * strides[0] + c * strides[1] + h * strides[2] + w *
// strides[3] -> out (N, H + top + bottom, W + left + right, 3) contiguous, zeros in the padding.
cudaError_t preprocess(DType dtype, const uint8_t* images, void* out, int64_t batch,
                       int64_t height, int64_t width, const int64_t strides[4], int64_t top,
                       int64_t bottom, int64_t left, int64_t right, PreprocessAffine affine,
                       cudaStream_t stream);

// Element strides of a (Cout, 3, 3, 3) weight, read in place in any layout.
struct StemWeightStrides {
  int64_t o, c, h, w;
};

// out (N, H', W', Cout) contiguous = relu(conv3x3_valid(x) + bias) for x (N, 3, H' + 2, W' + 2)
// read at n * x_strides[0] + c * x_strides[1] + h * x_strides[2] + w * x_strides[3]. Cout a
// multiple of 8, 28 * Cout floats of shared memory; out 16-byte aligned (32 in fp32). At most
// max_blocks blocks of 256 threads (a few per SM).
cudaError_t stem_conv_bias_relu(DType dtype, const void* x, const void* weight, const void* bias,
                                void* out, int64_t batch, int64_t out_height, int64_t out_width,
                                const int64_t x_strides[4], StemWeightStrides weight_strides,
                                int cout, int max_blocks, cudaStream_t stream);

}  // namespace cuda
}  // namespace bagnet_fast
