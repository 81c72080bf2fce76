// CUDA implementations of the bagnet_fast operators: GEMMs through ATen (cuBLAS/cuBLASLt), the
// memory-bound work around them through our kernels in kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "../checks.h"
#include "../preprocess.h"
#include "../stem.h"
#include "kernels.h"

namespace bagnet_fast {
namespace {

cuda::DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "bagnet_fast: CUDA ops support float32, float16 and bfloat16, got ", type);
  }
}

void check_cuda_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "bagnet_fast: ", name, " must be a CUDA tensor, got ", t.device());
  check_image(t, name);
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "bagnet_fast: ", kernel, " launch failed: ",
              cudaGetErrorString(status));
}

// The (N*H*W, C) pixel matrix of a channels-last (N, C, H, W) tensor (a view), and back.
at::Tensor pixel_matrix(const at::Tensor& x_cl) {
  return x_cl.permute({0, 2, 3, 1}).reshape({-1, x_cl.size(1)});
}
at::Tensor as_image(const at::Tensor& m, const at::Tensor& like) {
  return m.view({like.size(0), like.size(2), like.size(3), m.size(1)}).permute({0, 3, 1, 2});
}

// out <- act(y + bias + residual cropped); y and out channels-last contiguous, checked.
void bias_residual_act_into(const at::Tensor& out, const at::Tensor& y, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual, bool relu) {
  check_cuda_image(y, "y");
  const auto dtype = kernel_dtype(y.scalar_type());
  check_bias(bias, y.size(1), y, "bias", "y");
  const at::Tensor bias_c = bias.contiguous();
  at::Tensor r;
  int64_t strides[3] = {0, 0, 0};
  if (residual.has_value()) {
    r = *residual;
    check_residual_crop(r, y);
    // Any view with unit channel stride is read in place (a top-left crop of a channels-last
    // map needs no copy); anything else is made channels-last first.
    if (r.size(1) > 1 && r.stride(1) != 1) r = r.contiguous(at::MemoryFormat::ChannelsLast);
    strides[0] = r.stride(0);
    strides[1] = r.stride(2);
    strides[2] = r.stride(3);
  }
  check_launch(cuda::bias_residual_act(dtype, y.const_data_ptr(), bias_c.const_data_ptr(),
                                       r.defined() ? r.const_data_ptr() : nullptr,
                                       out.mutable_data_ptr(), y.size(0), y.size(2), y.size(3),
                                       y.size(1), strides, relu, at::cuda::getCurrentCUDAStream()),
               "bias_residual_act");
}

at::Tensor bias_residual_act_cuda(const at::Tensor& y, const at::Tensor& bias,
                                  const std::optional<at::Tensor>& residual, bool relu) {
  check_cuda_image(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor y_cl = y.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty_like(y_cl, y_cl.options().memory_format(at::MemoryFormat::ChannelsLast));
  bias_residual_act_into(out, y_cl, bias, residual, relu);
  return out;
}

at::Tensor spatial_mean_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& bias) {
  check_cuda_image(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = kernel_dtype(x.scalar_type());
  check_matrix(weight, weight.size(0), x.size(1), bias, x, "weight");
  const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options());
  check_launch(cuda::spatial_mean(dtype, x_cl.const_data_ptr(), mean.mutable_data_ptr(), x.size(0),
                                  x.size(2) * x.size(3), x.size(1),
                                  at::cuda::getCurrentCUDAStream()),
               "spatial_mean");
  return at::addmm(bias, mean, weight.t());
}

// relu(bias + x w), the ReLU keeping NaN as torch.relu does. at::_addmm_activation takes
// cuBLASLt's RELU_BIAS epilogue (one write of the output); whether that epilogue keeps a NaN is
// not documented, so it is checked once per device and dtype with a 2x16 GEMM, and where it
// does not, the ReLU runs as a separate relu_ (NaN-keeping) pass.
at::Tensor gemm_bias_relu(const at::Tensor& bias, const at::Tensor& x, const at::Tensor& w) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, bool> keeps_nan;
  const std::pair<int, int> key{static_cast<int>(x.get_device()), static_cast<int>(x.scalar_type())};
  bool keeps;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto found = keeps_nan.find(key);
    if (found == keeps_nan.end()) {
      const at::Tensor a = at::full({2, 16}, std::numeric_limits<float>::quiet_NaN(), x.options());
      const at::Tensor b = at::ones({16, 16}, x.options());
      const at::Tensor y = at::_addmm_activation(at::zeros({16}, x.options()), a, b);
      found = keeps_nan.emplace(key, y.isnan().all().item<bool>()).first;
    }
    keeps = found->second;
  }
  return keeps ? at::_addmm_activation(bias, x, w) : at::addmm(bias, x, w).relu_();
}

// out <- relu(W3 relu(W2 relu(W1 x + b1) + b2) + b3 + x) on the pixel matrix. The first two
// GEMMs add the bias and apply the ReLU in cuBLASLt's epilogue (at::_addmm_activation takes the
// Lt path with the RELU_BIAS epilogue for a contiguous 1-D bias and more than one row, see
// isInputCompliesAddmmCudaLt in ATen's cuda/Blas.cpp; otherwise GEMM + relu_): one write of
// each intermediate instead of a GEMM write plus a read-modify-write pass. The last
// GEMM's bias, the residual and the ReLU go through our kernel; out may be x (in place).
void pointwise_bottleneck_into(const at::Tensor& out, const at::Tensor& x_cl, const at::Tensor& w1,
                               const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                               const at::Tensor& w3, const at::Tensor& b3) {
  const int64_t channels = x_cl.size(1);
  const int64_t planes = w1.size(0);
  kernel_dtype(x_cl.scalar_type());
  check_pointwise_weight(w1, planes, channels, b1, x_cl, "w1");
  check_pointwise_weight(w2, planes, planes, b2, x_cl, "w2");
  check_pointwise_weight(w3, channels, planes, b3, x_cl, "w3");
  if (x_cl.numel() == 0) return;
  at::Tensor t = gemm_bias_relu(b1, pixel_matrix(x_cl), w1.flatten(1).t());
  t = gemm_bias_relu(b2, t, w2.flatten(1).t());
  t = at::mm(t, w3.flatten(1).t());
  bias_residual_act_into(out, as_image(t, x_cl), b3, x_cl, true);
}

at::Tensor pointwise_bottleneck_cuda(const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& b1, const at::Tensor& w2,
                                     const at::Tensor& b2, const at::Tensor& w3,
                                     const at::Tensor& b3) {
  check_cuda_image(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty_like(x_cl, x_cl.options().memory_format(at::MemoryFormat::ChannelsLast));
  pointwise_bottleneck_into(out, x_cl, w1, b1, w2, b2, w3, b3);
  return out;
}

void pointwise_bottleneck_inplace_cuda(const at::Tensor& x, const at::Tensor& w1,
                                       const at::Tensor& b1, const at::Tensor& w2,
                                       const at::Tensor& b2, const at::Tensor& w3,
                                       const at::Tensor& b3) {
  check_cuda_image(x, "x");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bagnet_fast: pointwise_bottleneck_ needs x in channels-last memory");
  const c10::cuda::CUDAGuard guard(x.device());
  pointwise_bottleneck_into(x, x, w1, b1, w2, b2, w3, b3);
}

at::Tensor preprocess_cuda(const at::Tensor& images, at::ArrayRef<double> mean,
                           at::ArrayRef<double> std, at::IntArrayRef pad, at::ScalarType dtype) {
  TORCH_CHECK(images.is_cuda(), "bagnet_fast: preprocess: images must be a CUDA tensor here, got ",
              images.device());
  const PreprocessParams p = check_preprocess_args(images, mean, std, pad, dtype);
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out = preprocess_output(images, p, dtype);
  cuda::PreprocessAffine affine{};
  for (int c = 0; c < 3; ++c) {
    affine.scale[c] = p.scale[c];
    affine.shift[c] = p.shift[c];
  }
  const int64_t strides[4] = {images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  check_launch(cuda::preprocess(kernel_dtype(dtype), images.const_data_ptr<uint8_t>(),
                                out.mutable_data_ptr(), images.size(0), images.size(2),
                                images.size(3), strides, p.top, p.bottom, p.left, p.right, affine,
                                at::cuda::getCurrentCUDAStream()),
               "preprocess");
  return out;
}

at::Tensor stem_conv_bias_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.is_cuda(), "bagnet_fast: stem_conv_bias_relu: x must be a CUDA tensor here, got ", x.device());
  check_stem_args(x, weight, bias);
  // 28 * Cout fp32 values of shared memory: within the 48 KB every GPU gives without opting in.
  TORCH_CHECK(weight.size(0) <= 256, "bagnet_fast: stem_conv_bias_relu on CUDA supports up to 256 output "
              "channels, got ", weight.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = stem_output(x, weight);
  const int64_t x_strides[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const cuda::StemWeightStrides ws{weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)};
  const int max_blocks = 8 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  check_launch(cuda::stem_conv_bias_relu(kernel_dtype(x.scalar_type()), x.const_data_ptr(),
                                         weight.const_data_ptr(), bias.const_data_ptr(),
                                         out.mutable_data_ptr(), out.size(0), out.size(2), out.size(3),
                                         x_strides, ws, static_cast<int>(weight.size(0)), max_blocks,
                                         at::cuda::getCurrentCUDAStream()),
               "stem_conv_bias_relu");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bagnet_fast, CUDA, m) {
  m.impl("pointwise_bottleneck", &pointwise_bottleneck_cuda);
  m.impl("pointwise_bottleneck_", &pointwise_bottleneck_inplace_cuda);
  m.impl("bias_residual_act", &bias_residual_act_cuda);
  m.impl("spatial_mean_linear", &spatial_mean_linear_cuda);
  m.impl("preprocess", &preprocess_cuda);
  m.impl("stem_conv_bias_relu", &stem_conv_bias_relu_cuda);
}

}  // namespace bagnet_fast
