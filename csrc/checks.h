// Argument checks shared by the CPU and CUDA implementations of the bagnet_fast operators: one
// function per precondition, one message for it everywhere ("bagnet_fast: <name> must ...").
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace bagnet_fast {

// A 4-D (N, C, H, W) floating-point activation.
inline void check_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "bagnet_fast: ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(t.is_floating_point(), "bagnet_fast: ", name, " must be floating point, got ",
              t.scalar_type());
}

// t has x's dtype and device.
inline void check_like(const at::Tensor& t, const at::Tensor& x, const std::string& name,
                       const char* x_name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bagnet_fast: ", name, " must have the dtype of ",
              x_name, " (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "bagnet_fast: ", name, " must be on the device of ",
              x_name, " (", x.device(), "), got ", t.device());
}

// A bias (n,) like x (called x_name in the message).
inline void check_bias(const at::Tensor& b, int64_t n, const at::Tensor& x, const std::string& name,
                       const char* x_name = "x") {
  TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "bagnet_fast: ", name, " must have shape (", n,
              "), got ", b.sizes());
  check_like(b, x, name, x_name);
}

// A 1x1 conv weight (out, in, 1, 1) and its bias (out,), like x. Weights prepacked by oneDNN
// (mkldnn layout, CPU only) carry their logical sizes but no strides: only those are checked.
inline void check_pointwise_weight(const at::Tensor& w, int64_t out, int64_t in, const at::Tensor& b,
                                   const at::Tensor& x, const char* name) {
  TORCH_CHECK(w.dim() == 4 && w.size(0) == out && w.size(1) == in && w.size(2) == 1 && w.size(3) == 1,
              "bagnet_fast: ", name, " must have shape (", out, ", ", in, ", 1, 1), got ", w.sizes());
  if (!w.is_mkldnn()) check_like(w, x, name, "x");
  check_bias(b, out, x, std::string("bias of ") + name);
}

// A (rows, cols) matrix and its bias (rows,), like x.
inline void check_matrix(const at::Tensor& w, int64_t rows, int64_t cols, const at::Tensor& b,
                         const at::Tensor& x, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, "bagnet_fast: ", name,
              " must have shape (", rows, ", ", cols, "), got ", w.sizes());
  check_like(w, x, name, "x");
  check_bias(b, rows, x, std::string("bias of ") + name);
}

// A residual (N, C, >= H, >= W) that the top-left crop fits to y (N, C, H, W), like y.
inline void check_residual_crop(const at::Tensor& r, const at::Tensor& y) {
  check_image(r, "residual");
  check_like(r, y, "residual", "y");
  TORCH_CHECK(r.size(0) == y.size(0) && r.size(1) == y.size(1) && r.size(2) >= y.size(2) &&
                  r.size(3) >= y.size(3),
              "bagnet_fast: residual ", r.sizes(), " cannot be cropped to y ", y.sizes());
}

}  // namespace bagnet_fast
