// Memory-bound CUDA kernels around the GEMMs of a BagNet: one read and one write each, fp32
// arithmetic for every storage dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace bagnet_fast {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One thread per (image, channel): consecutive threads read consecutive channels of a pixel,
// so every load is coalesced along C.
template <typename T>
__global__ void spatial_mean_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t pixels,
                                    int64_t channels) {
  const int64_t n = blockIdx.y;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  const T* image = x + n * pixels * channels + c;
  float sum = 0.f;
  for (int64_t p = 0; p < pixels; ++p) sum += to_float(image[p * channels]);
  out[n * channels + c] = from_float<T>(sum / static_cast<float>(pixels));
}

template <typename T>
__global__ void bias_residual_act_kernel(const T* __restrict__ y, const T* __restrict__ bias,
                                         const T* __restrict__ residual, T* out, int64_t total,
                                         int64_t height, int64_t width, int64_t channels,
                                         int64_t residual_height, int64_t residual_width,
                                         bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += stride) {
    const int64_t c = i % channels;
    float v = to_float(y[i]) + to_float(bias[c]);
    if (residual != nullptr) {
      const int64_t pixel = i / channels;
      const int64_t w = pixel % width;
      const int64_t h = (pixel / width) % height;
      const int64_t n = pixel / (width * height);
      v += to_float(residual[((n * residual_height + h) * residual_width + w) * channels + c]);
    }
    out[i] = from_float<T>(relu ? fmaxf(v, 0.f) : v);
  }
}

template <typename T>
cudaError_t launch_spatial_mean(const void* x, void* out, int64_t batch, int64_t pixels,
                                int64_t channels, cudaStream_t stream) {
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>((channels + kThreads - 1) / kThreads),
                  static_cast<unsigned>(batch));
  spatial_mean_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x),
                                                        static_cast<T*>(out), pixels, channels);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bias_residual_act(const void* y, const void* bias, const void* residual,
                                     void* out, int64_t batch, int64_t height, int64_t width,
                                     int64_t channels, int64_t residual_height,
                                     int64_t residual_width, bool relu, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = batch * height * width * channels;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
  bias_residual_act_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const T*>(bias), static_cast<const T*>(residual),
      static_cast<T*>(out), total, height, width, channels, residual_height, residual_width, relu);
  return cudaGetLastError();
}

}  // namespace

cudaError_t spatial_mean(DType dtype, const void* x, void* out, int64_t batch, int64_t pixels,
                         int64_t channels, cudaStream_t stream) {
  if (batch == 0 || channels == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_spatial_mean<float>(x, out, batch, pixels, channels, stream);
    case DType::kFloat16:
      return launch_spatial_mean<__half>(x, out, batch, pixels, channels, stream);
    case DType::kBFloat16:
      return launch_spatial_mean<__nv_bfloat16>(x, out, batch, pixels, channels, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bias_residual_act(DType dtype, const void* y, const void* bias, const void* residual,
                              void* out, int64_t batch, int64_t height, int64_t width,
                              int64_t channels, int64_t residual_height, int64_t residual_width,
                              bool relu, cudaStream_t stream) {
  if (batch * height * width * channels == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_bias_residual_act<float>(y, bias, residual, out, batch, height, width,
                                             channels, residual_height, residual_width, relu,
                                             stream);
    case DType::kFloat16:
      return launch_bias_residual_act<__half>(y, bias, residual, out, batch, height, width,
                                              channels, residual_height, residual_width, relu,
                                              stream);
    case DType::kBFloat16:
      return launch_bias_residual_act<__nv_bfloat16>(y, bias, residual, out, batch, height,
                                                     width, channels, residual_height,
                                                     residual_width, relu, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bagnet_fast
