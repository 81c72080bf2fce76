// Argument checks of bagnet_fast::stem_conv_bias_relu shared by its CPU and CUDA kernels, so that
// both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

namespace bagnet_fast {

// The merged BagNet stem has 3 input channels and a 3x3 kernel; 8 output channels per thread
// (one 16-byte store in 16-bit dtypes) on the GPU.
constexpr int64_t kStemChannelGroup = 8;

inline void check_stem_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 3, "bagnet_fast: stem_conv_bias_relu: x must be (N, 3, H, W), got ",
              x.sizes());
  TORCH_CHECK(x.size(2) >= 3 && x.size(3) >= 3,
              "bagnet_fast: stem_conv_bias_relu: x must be at least 3x3 pixels, got ", x.size(2), "x",
              x.size(3));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "bagnet_fast: stem_conv_bias_relu supports float32, float16 and bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 3 && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(0) % kStemChannelGroup == 0 && weight.size(0) > 0,
              "bagnet_fast: stem_conv_bias_relu: weight must be (Cout, 3, 3, 3) with Cout a multiple of ",
              kStemChannelGroup, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0),
              "bagnet_fast: stem_conv_bias_relu: bias must have shape (", weight.size(0), "), got ",
              bias.sizes());
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "bagnet_fast: stem_conv_bias_relu: weight and bias must have the dtype and device of x (",
                x.scalar_type(), ", ", x.device(), "), got ", t->scalar_type(), ", ", t->device());
  }
}

// The (N, Cout, H - 2, W - 2) channels-last output.
inline at::Tensor stem_output(const at::Tensor& x, const at::Tensor& weight) {
  return at::empty({x.size(0), weight.size(0), x.size(2) - 2, x.size(3) - 2},
                   x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace bagnet_fast
