// Argument checks and constants of bagnet_fast::preprocess shared by its CPU and CUDA kernels,
// so that both reject the same inputs with the same messages and compute the same numbers.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace bagnet_fast {

// out = x * scale[c] + shift[c] == (x / 255 - mean[c]) / std[c], with scale and shift rounded
// to float once (computed in double). Every implementation (CPU, CUDA, the pure-PyTorch
// fallback in bagnet_fast/preprocess.py) uses this form, so they agree to an FMA rounding.
struct PreprocessParams {
  std::array<float, 3> scale;
  std::array<float, 3> shift;
  int64_t top, bottom, left, right;
  int64_t out_height, out_width;
};

inline PreprocessParams check_preprocess_args(const at::Tensor& images, at::ArrayRef<double> mean,
                                              at::ArrayRef<double> std, at::IntArrayRef pad,
                                              at::ScalarType dtype) {
  TORCH_CHECK(images.scalar_type() == at::kByte, "bagnet_fast: preprocess: images must be uint8, got ",
              images.scalar_type());
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3,
              "bagnet_fast: preprocess: images must be (N, 3, H, W) uint8 (an (N, H, W, 3) array "
              "permuted to it is fine), got shape ",
              images.sizes());
  TORCH_CHECK(mean.size() == 3 && std.size() == 3,
              "bagnet_fast: preprocess: mean and std must have 3 values, got ", mean.size(), " and ",
              std.size());
  TORCH_CHECK(pad.size() == 4, "bagnet_fast: preprocess: pad must be [top, bottom, left, right], got ",
              pad.size(), " values");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "bagnet_fast: preprocess: dtype must be float32, float16 or bfloat16, got ", dtype);
  PreprocessParams p{};
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK(std[c] > 0, "bagnet_fast: preprocess: std must be positive, got ", std[c]);
    p.scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    p.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  for (int64_t v : pad) {
    TORCH_CHECK(v >= 0, "bagnet_fast: preprocess: pad must be non-negative, got ", pad);
  }
  p.top = pad[0];
  p.bottom = pad[1];
  p.left = pad[2];
  p.right = pad[3];
  p.out_height = images.size(2) + p.top + p.bottom;
  p.out_width = images.size(3) + p.left + p.right;
  return p;
}

// The (N, 3, H', W') channels-last output.
inline at::Tensor preprocess_output(const at::Tensor& images, const PreprocessParams& p,
                                    at::ScalarType dtype) {
  return at::empty({images.size(0), 3, p.out_height, p.out_width},
                   images.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace bagnet_fast
