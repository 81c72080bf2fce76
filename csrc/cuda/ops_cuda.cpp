// CUDA implementations of the bagnet_fast operators: GEMMs through ATen (cuBLAS), the
// memory-bound epilogues through our kernels in kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"

namespace bagnet_fast {
namespace {

cuda::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "bagnet_fast: CUDA ops support float32, float16 and bfloat16, got ",
                  t.scalar_type());
  }
}

void check_cuda_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "bagnet_fast: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, "bagnet_fast: ", name, " must be 4-D (N, C, H, W), got ", t.dim(),
              "-D");
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "bagnet_fast: ", kernel, " launch failed: ",
              cudaGetErrorString(status));
}

at::Tensor bias_residual_act_cuda(const at::Tensor& y, const at::Tensor& bias,
                                  const std::optional<at::Tensor>& residual, bool relu) {
  check_cuda_image(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  const auto dtype = kernel_dtype(y);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == y.size(1), "bagnet_fast: bias must have shape (",
              y.size(1), "), got ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == y.scalar_type() && bias.device() == y.device(),
              "bagnet_fast: bias must have the dtype and device of y");
  const at::Tensor y_cl = y.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bias_c = bias.contiguous();
  at::Tensor residual_cl;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_cuda_image(r, "residual");
    TORCH_CHECK(r.scalar_type() == y.scalar_type() && r.device() == y.device(),
                "bagnet_fast: residual must have the dtype and device of y");
    TORCH_CHECK(r.size(0) == y.size(0) && r.size(1) == y.size(1) && r.size(2) >= y.size(2) &&
                    r.size(3) >= y.size(3),
                "bagnet_fast: residual ", r.sizes(), " cannot be cropped to y ", y.sizes());
    residual_cl = r.contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = at::empty_like(y_cl, y_cl.options().memory_format(at::MemoryFormat::ChannelsLast));
  check_launch(
      cuda::bias_residual_act(dtype, y_cl.data_ptr(), bias_c.data_ptr(),
                              residual_cl.defined() ? residual_cl.data_ptr() : nullptr,
                              out.data_ptr(), y.size(0), y.size(2), y.size(3), y.size(1),
                              residual_cl.defined() ? residual_cl.size(2) : y.size(2),
                              residual_cl.defined() ? residual_cl.size(3) : y.size(3), relu,
                              at::cuda::getCurrentCUDAStream()),
      "bias_residual_act");
  return out;
}

at::Tensor spatial_mean_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& bias) {
  check_cuda_image(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = kernel_dtype(x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "bagnet_fast: weight must be (K, ",
              x.size(1), "), got ", weight.sizes());
  const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options());
  check_launch(cuda::spatial_mean(dtype, x_cl.data_ptr(), mean.data_ptr(), x.size(0),
                                  x.size(2) * x.size(3), x.size(1),
                                  at::cuda::getCurrentCUDAStream()),
               "spatial_mean");
  return at::addmm(bias, mean, weight.t());
}

// 1x1 convolutions as GEMMs on the (N*H*W, C) pixel matrix; bias, residual and ReLU in our
// epilogue kernel.
at::Tensor pointwise_bottleneck_cuda(const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& b1, const at::Tensor& w2,
                                     const at::Tensor& b2, const at::Tensor& w3,
                                     const at::Tensor& b3) {
  check_cuda_image(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t channels = x.size(1);
  const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor pixels = x_cl.permute({0, 2, 3, 1}).reshape({-1, channels});
  auto as_image = [&](const at::Tensor& m) {
    return m.view({x.size(0), x.size(2), x.size(3), m.size(1)}).permute({0, 3, 1, 2});
  };
  at::Tensor t = at::mm(pixels, w1.flatten(1).t());
  t = bias_residual_act_cuda(as_image(t), b1, std::nullopt, true);
  t = at::mm(t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}), w2.flatten(1).t());
  t = bias_residual_act_cuda(as_image(t), b2, std::nullopt, true);
  t = at::mm(t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}), w3.flatten(1).t());
  return bias_residual_act_cuda(as_image(t), b3, x_cl, true);
}

void pointwise_bottleneck_inplace_cuda(const at::Tensor& x, const at::Tensor& w1,
                                       const at::Tensor& b1, const at::Tensor& w2,
                                       const at::Tensor& b2, const at::Tensor& w3,
                                       const at::Tensor& b3) {
  x.copy_(pointwise_bottleneck_cuda(x, w1, b1, w2, b2, w3, b3));
}

}  // namespace

TORCH_LIBRARY_IMPL(bagnet_fast, CUDA, m) {
  m.impl("pointwise_bottleneck", &pointwise_bottleneck_cuda);
  m.impl("pointwise_bottleneck_", &pointwise_bottleneck_inplace_cuda);
  m.impl("bias_residual_act", &bias_residual_act_cuda);
  m.impl("spatial_mean_linear", &spatial_mean_linear_cuda);
}

}  // namespace bagnet_fast
