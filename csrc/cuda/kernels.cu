// Memory-bound CUDA kernels around the GEMMs of a BagNet: one read and one write each, fp32
// arithmetic for every storage dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace bagnet_fast {
namespace cuda {
namespace {

// max(v, 0) keeping NaN, as torch.relu does: fmaxf(NaN, 0) is 0 (IEEE maxNum), which would
// turn a NaN input into finite logits.
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

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

// kVec consecutive elements moved with one aligned load/store (16 bytes when kVec * sizeof(T)
// is 16).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

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

// Thread (x, y) of a block handles pixel blockIdx.x * blockDim.y + y, channels x * kVec, ...
// with kVec-wide loads: the pixel -> (n, h, w) divisions happen once per thread, not per
// element. No __restrict__ on y/residual: out may alias them (element by element).
template <typename T, int kVec>
__global__ void bias_residual_act_kernel(const T* y, const T* __restrict__ bias, const T* residual,
                                         T* out, int64_t pixels, int64_t height, int64_t width,
                                         int64_t channels, int64_t residual_n, int64_t residual_h,
                                         int64_t residual_w, bool relu) {
  using P = Pack<T, kVec>;
  for (int64_t pixel = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; pixel < pixels;
       pixel += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t offset = pixel * channels;
    int64_t residual_offset = 0;
    if (residual != nullptr) {
      const int64_t w = pixel % width;
      const int64_t h = (pixel / width) % height;
      const int64_t n = pixel / (width * height);
      residual_offset = n * residual_n + h * residual_h + w * residual_w;
    }
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < channels;
         c += static_cast<int64_t>(blockDim.x) * kVec) {
      const P yv = *reinterpret_cast<const P*>(y + offset + c);
      const P bv = *reinterpret_cast<const P*>(bias + c);
      P rv{};
      if (residual != nullptr) rv = *reinterpret_cast<const P*>(residual + residual_offset + c);
      P ov;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float v = to_float(yv.v[k]) + to_float(bv.v[k]);
        if (residual != nullptr) v += to_float(rv.v[k]);
        ov.v[k] = from_float<T>(relu ? relu_keep_nan(v) : v);
      }
      *reinterpret_cast<P*>(out + offset + c) = ov;
    }
  }
}

// One block per output row (image n, row ho); threads over the row's pixels. Padding pixels
// are written as zeros, so the output is touched exactly once.
template <typename T>
__global__ void preprocess_kernel(const uint8_t* __restrict__ images, T* __restrict__ out,
                                  int64_t rows, int64_t height, int64_t width, int64_t out_height,
                                  int64_t out_width, int64_t top, int64_t left, int64_t stride_n,
                                  int64_t stride_c, int64_t stride_h, int64_t stride_w,
                                  PreprocessAffine affine) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / out_height;
    const int64_t h = row % out_height - top;
    const bool inside_row = h >= 0 && h < height;
    const int64_t row_offset = n * stride_n + h * stride_h;
    T* dst = out + row * out_width * 3;
    for (int64_t wo = threadIdx.x; wo < out_width; wo += blockDim.x) {
      const int64_t w = wo - left;
      float v[3] = {0.f, 0.f, 0.f};
      if (inside_row && w >= 0 && w < width) {
        const uint8_t* src = images + row_offset + w * stride_w;
#pragma unroll
        for (int c = 0; c < 3; ++c) {
          v[c] = static_cast<float>(src[c * stride_c]) * affine.scale[c] + affine.shift[c];
        }
      }
#pragma unroll
      for (int c = 0; c < 3; ++c) dst[3 * wo + c] = from_float<T>(v[c]);
    }
  }
}

template <typename T>
cudaError_t launch_spatial_mean(const void* x, void* out, int64_t batch, int64_t pixels,
                                int64_t channels, cudaStream_t stream) {
  constexpr int kThreads = 128;
  constexpr int64_t kMaxGridY = 65535;  // gridDim.y limit: launch larger batches in chunks
  for (int64_t start = 0; start < batch; start += kMaxGridY) {
    const int64_t images = std::min(kMaxGridY, batch - start);
    const dim3 grid(static_cast<unsigned>((channels + kThreads - 1) / kThreads),
                    static_cast<unsigned>(images));
    spatial_mean_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x) + start * pixels * channels,
        static_cast<T*>(out) + start * channels, pixels, channels);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int kVec>
cudaError_t launch_bias_residual_act_vec(const void* y, const void* bias, const void* residual,
                                         void* out, int64_t pixels, int64_t height, int64_t width,
                                         int64_t channels, const int64_t residual_strides[3],
                                         bool relu, cudaStream_t stream) {
  constexpr int kThreads = 256;
  // x covers a pixel's channel vectors (a power of two up to 256), y the pixels of the block.
  const int64_t vectors = channels / kVec;
  int threads_x = 1;
  while (threads_x < vectors && threads_x < kThreads) threads_x *= 2;
  const dim3 block(threads_x, kThreads / threads_x);
  const int64_t blocks = std::min<int64_t>((pixels + block.y - 1) / block.y, kMaxGrid);
  bias_residual_act_kernel<T, kVec><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const T*>(bias), static_cast<const T*>(residual),
      static_cast<T*>(out), pixels, height, width, channels, residual_strides[0],
      residual_strides[1], residual_strides[2], relu);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bias_residual_act(const void* y, const void* bias, const void* residual,
                                     void* out, int64_t batch, int64_t height, int64_t width,
                                     int64_t channels, const int64_t residual_strides[3],
                                     bool relu, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t pixels = batch * height * width;
  bool vectorised = channels % kVec == 0 && aligned16(y) && aligned16(bias) && aligned16(out);
  if (residual != nullptr) {
    vectorised = vectorised && aligned16(residual) && residual_strides[0] % kVec == 0 &&
                 residual_strides[1] % kVec == 0 && residual_strides[2] % kVec == 0;
  }
  if (vectorised) {
    return launch_bias_residual_act_vec<T, kVec>(y, bias, residual, out, pixels, height, width,
                                                 channels, residual_strides, relu, stream);
  }
  return launch_bias_residual_act_vec<T, 1>(y, bias, residual, out, pixels, height, width,
                                            channels, residual_strides, relu, stream);
}

template <typename T>
cudaError_t launch_preprocess(const uint8_t* images, void* out, int64_t batch, int64_t height,
                              int64_t width, const int64_t strides[4], int64_t top, int64_t bottom,
                              int64_t left, int64_t right, PreprocessAffine affine,
                              cudaStream_t stream) {
  constexpr int kThreads = 128;
  const int64_t out_height = height + top + bottom;
  const int64_t rows = batch * out_height;
  const int64_t blocks = std::min<int64_t>(rows, kMaxGrid);
  preprocess_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      images, static_cast<T*>(out), rows, height, width, out_height, width + left + right, top,
      left, strides[0], strides[1], strides[2], strides[3], affine);
  return cudaGetLastError();
}

// The merged stem, relu(conv3x3_valid(x) + bias) with 3 input channels: a direct convolution.
// Work item = (output pixel, group of 8 output channels): 27 input values, 216 FMAs from the
// fp32 weights in shared memory, one 16-byte store (two in fp32). The 8 items of a pixel are
// consecutive threads, so a warp writes 4 whole pixels (512 contiguous bytes in 16-bit dtypes)
// and reads each input value once per pixel (broadcast); neighbouring pixels' windows overlap
// in L1. A grid-stride loop over a grid of a few blocks per SM fills shared memory once per
// block, not once per item.
template <typename T>
__global__ void stem_conv_bias_relu_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                           const T* __restrict__ bias, T* __restrict__ out,
                                           int64_t pixels, int64_t out_height, int64_t out_width,
                                           int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                           StemWeightStrides ws, int cout) {
  extern __shared__ float stem_smem[];  // taps[(kh * 3 + kw) * 3 + c][o], then bias[o]
  float* taps = stem_smem;
  float* b = stem_smem + 27 * cout;
  for (int i = threadIdx.x; i < 28 * cout; i += blockDim.x) {
    if (i < 27 * cout) {
      const int o = i % cout, tc = i / cout, c = tc % 3, t = tc / 3;
      taps[i] = to_float(weight[o * ws.o + c * ws.c + (t / 3) * ws.h + (t % 3) * ws.w]);
    } else {
      b[i - 27 * cout] = to_float(bias[i - 27 * cout]);
    }
  }
  __syncthreads();
  constexpr int kGroup = 8;
  using P = Pack<T, kGroup>;
  const int groups = cout / kGroup;
  const int64_t items = pixels * groups;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pixel = item / groups;
    const int o0 = static_cast<int>(item % groups) * kGroup;
    const int64_t wo = pixel % out_width;
    const int64_t ho = (pixel / out_width) % out_height;
    const int64_t n = pixel / (out_width * out_height);
    const T* window = x + n * sn + ho * sh + wo * sw;
    float acc[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) acc[k] = b[o0 + k];
#pragma unroll
    for (int t = 0; t < 9; ++t) {
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const float v = to_float(window[c * sc + (t / 3) * sh + (t % 3) * sw]);
        const float* w = taps + (t * 3 + c) * cout + o0;
#pragma unroll
        for (int k = 0; k < kGroup; ++k) acc[k] = fmaf(v, w[k], acc[k]);
      }
    }
    P result;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) result.v[k] = from_float<T>(relu_keep_nan(acc[k]));
    *reinterpret_cast<P*>(out + pixel * cout + o0) = result;
  }
}

template <typename T>
cudaError_t launch_stem_conv_bias_relu(const void* x, const void* weight, const void* bias, void* out,
                                       int64_t batch, int64_t out_height, int64_t out_width,
                                       const int64_t x_strides[4], StemWeightStrides ws, int cout,
                                       int max_blocks, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t pixels = batch * out_height * out_width;
  const int64_t items = pixels * (cout / 8);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, max_blocks));
  const size_t shared = sizeof(float) * 28 * cout;
  stem_conv_bias_relu_kernel<T><<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
      static_cast<T*>(out), pixels, out_height, out_width, x_strides[0], x_strides[1], x_strides[2],
      x_strides[3], ws, cout);
  return cudaGetLastError();
}

}  // namespace

cudaError_t stem_conv_bias_relu(DType dtype, const void* x, const void* weight, const void* bias,
                                void* out, int64_t batch, int64_t out_height, int64_t out_width,
                                const int64_t x_strides[4], StemWeightStrides weight_strides,
                                int cout, int max_blocks, cudaStream_t stream) {
  if (batch * out_height * out_width == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_stem_conv_bias_relu<float>(x, weight, bias, out, batch, out_height, out_width,
                                               x_strides, weight_strides, cout, max_blocks, stream);
    case DType::kFloat16:
      return launch_stem_conv_bias_relu<__half>(x, weight, bias, out, batch, out_height, out_width,
                                                x_strides, weight_strides, cout, max_blocks, stream);
    case DType::kBFloat16:
      return launch_stem_conv_bias_relu<__nv_bfloat16>(x, weight, bias, out, batch, out_height,
                                                       out_width, x_strides, weight_strides, cout,
                                                       max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

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
                              int64_t channels, const int64_t residual_strides[3], bool relu,
                              cudaStream_t stream) {
  if (batch * height * width * channels == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_bias_residual_act<float>(y, bias, residual, out, batch, height, width,
                                             channels, residual_strides, relu, stream);
    case DType::kFloat16:
      return launch_bias_residual_act<__half>(y, bias, residual, out, batch, height, width,
                                              channels, residual_strides, relu, stream);
    case DType::kBFloat16:
      return launch_bias_residual_act<__nv_bfloat16>(y, bias, residual, out, batch, height, width,
                                                     channels, residual_strides, relu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t preprocess(DType dtype, const uint8_t* images, void* out, int64_t batch,
                       int64_t height, int64_t width, const int64_t strides[4], int64_t top,
                       int64_t bottom, int64_t left, int64_t right, PreprocessAffine affine,
                       cudaStream_t stream) {
  if (batch == 0 || height + top + bottom == 0 || width + left + right == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_preprocess<float>(images, out, batch, height, width, strides, top, bottom,
                                      left, right, affine, stream);
    case DType::kFloat16:
      return launch_preprocess<__half>(images, out, batch, height, width, strides, top, bottom,
                                       left, right, affine, stream);
    case DType::kBFloat16:
      return launch_preprocess<__nv_bfloat16>(images, out, batch, height, width, strides, top,
                                              bottom, left, right, affine, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bagnet_fast
