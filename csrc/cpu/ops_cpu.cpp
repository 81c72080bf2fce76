// CPU implementations of the bagnet_fast operators.
//
// The GEMMs go through oneDNN (torch's mkldnn convolution ops, AVX-512 here), which ran at
// 300-450 GFLOP/s on this project's 2-core machine where at::mm (MKL) reached 195. What we add
// is the fusion around them: the whole 1x1-only bottleneck in one call, its residual add and
// ReLU inside the last GEMM's epilogue, written in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "../checks.h"
#include "../preprocess.h"
#include "../stem.h"

namespace bagnet_fast {
namespace {

// oneDNN 1x1 convolutions with fused post-ops (torch's mkldnn::_convolution_pointwise), called
// boxed so that no private C++ signature is assumed. They accept plain weights and weights
// prepacked by mkldnn::_reorder_convolution_weight (what the inference plan passes).
class OneDnnPointwise {
 public:
  OneDnnPointwise()
      : unary_(find("mkldnn::_convolution_pointwise", "")),
        inplace_(find("mkldnn::_convolution_pointwise_", "binary")),
        bf16_(bf16_supported()) {}

  // float32 always; bfloat16 where oneDNN has bf16 kernels for this CPU (AVX512-BF16, AMX or
  // AVX-NE-CONVERT; the development VM exposes only AVX2 and has none).
  bool available(const at::Tensor& x) const {
    return unary_.has_value() && inplace_.has_value() &&
           (x.scalar_type() == at::kFloat || (x.scalar_type() == at::kBFloat16 && bf16_));
  }

  // act(conv1x1(x) + b)
  at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool relu) const {
    torch::jit::Stack stack;
    stack.reserve(10);
    push_common(stack, x, w, b);
    stack.emplace_back(std::string(relu ? "relu" : "none"));
    stack.emplace_back(no_scalars());
    stack.emplace_back(std::string());
    unary_->callBoxed(&stack);
    return stack[0].toTensor();
  }

  // residual <- relu(conv1x1(x) + b + residual), in place (oneDNN binary-add + ReLU post-ops).
  void conv_add_relu_inplace(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w,
                             const at::Tensor& b) const {
    torch::jit::Stack stack;
    stack.reserve(13);
    stack.emplace_back(residual);
    push_common(stack, x, w, b);
    stack.emplace_back(std::string("add"));
    stack.emplace_back(c10::Scalar(1.0));
    stack.emplace_back(std::string("relu"));
    stack.emplace_back(no_scalars());
    stack.emplace_back(std::string());
    inplace_->callBoxed(&stack);
  }

 private:
  static std::optional<c10::OperatorHandle> find(const char* name, const char* overload) {
    return c10::Dispatcher::singleton().findSchema({name, overload});
  }
  static bool bf16_supported() {
    const auto op = find("mkldnn::_is_mkldnn_bf16_supported", "");
    if (!op.has_value()) return false;
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return stack.at(0).toBool();
  }
  static c10::impl::GenericList no_scalars() {
    return c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get()));
  }
  static void push_common(torch::jit::Stack& stack, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& b) {
    const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
    stack.emplace_back(x);
    stack.emplace_back(w);
    stack.emplace_back(b);
    stack.emplace_back(zeros);
    stack.emplace_back(ones);
    stack.emplace_back(ones);
    stack.emplace_back(int64_t{1});
  }

  std::optional<c10::OperatorHandle> unary_;
  std::optional<c10::OperatorHandle> inplace_;
  bool bf16_;
};

const OneDnnPointwise& onednn() {
  static const OneDnnPointwise instance;
  return instance;
}

// An (N*H*W, C) pixel matrix as the (1, C, 1, N*H*W) channels-last image oneDNN convolves.
at::Tensor as_image(const at::Tensor& pixels) {
  return pixels.t().view({1, pixels.size(1), 1, pixels.size(0)});
}

// x <- relu(W3 relu(W2 relu(W1 x + b1) + b2) + b3 + x), in place. Writing into x saves the
// output allocation and a pass: the last convolution adds its result to x and applies the ReLU
// in its epilogue. Processing the block in cache-sized pixel tiles was slower with oneDNN's
// convolutions (BagNet-33, batch 8, 224x224: 3.9 img/s with 4 MiB tiles, 8.3 with 32 MiB,
// 8.7 untiled) and only 2-3 % faster with its linear op, whose ReLU needs a separate pass.
void pointwise_bottleneck_inplace_cpu(const at::Tensor& x, const at::Tensor& w1,
                                      const at::Tensor& b1, const at::Tensor& w2,
                                      const at::Tensor& b2, const at::Tensor& w3,
                                      const at::Tensor& b3) {
  check_image(x, "x");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bagnet_fast: pointwise_bottleneck_ needs x in channels-last memory");
  const int64_t channels = x.size(1);
  const int64_t planes = w1.size(0);
  check_pointwise_weight(w1, planes, channels, b1, x, "w1");
  check_pointwise_weight(w2, planes, planes, b2, x, "w2");
  check_pointwise_weight(w3, channels, planes, b3, x, "w3");
  if (x.numel() == 0) return;

  const at::Tensor pixels = x.permute({0, 2, 3, 1}).view({-1, channels});
  const auto& dnn = onednn();
  // bf16 only with prepacked (oneDNN) weights: with plain ones torch's in-place binary convolution
  // falls back to conv + at::add_relu_, which has no bf16 CPU kernel (torch 2.14: "Unsupported
  // datatype for add_relu"). The plan always prepacks; plain bf16 weights take the GEMMs below.
  const bool packed = w1.is_mkldnn() && w2.is_mkldnn() && w3.is_mkldnn();
  if (dnn.available(x) && (x.scalar_type() == at::kFloat || packed)) {
    const at::Tensor image = as_image(pixels);
    at::Tensor t = dnn.conv(image, w1, b1, /*relu=*/true);
    t = dnn.conv(t, w2, b2, /*relu=*/true);
    dnn.conv_add_relu_inplace(image, t, w3, b3);
  } else {  // other dtypes (float64, float16): plain GEMMs
    TORCH_CHECK(!w1.is_mkldnn() && !w2.is_mkldnn() && !w3.is_mkldnn(),
                "bagnet_fast: pointwise_bottleneck_: oneDNN-prepacked weights need float32 x, or "
                "bfloat16 x with all three weights prepacked, on a CPU with oneDNN bf16 support");
    at::Tensor t = at::relu(at::addmm(b1, pixels, w1.flatten(1).t()));
    t = at::relu(at::addmm(b2, t, w2.flatten(1).t()));
    pixels.addmm_(t, w3.flatten(1).t()).add_(b3).clamp_min_(0);
  }
}

at::Tensor pointwise_bottleneck_cpu(const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2, const at::Tensor& w3,
                                    const at::Tensor& b3) {
  check_image(x, "x");
  at::Tensor out = x.clone(at::MemoryFormat::ChannelsLast);
  pointwise_bottleneck_inplace_cpu(out, w1, b1, w2, b2, w3, b3);
  return out;
}

at::Tensor bias_residual_act_cpu(const at::Tensor& y, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& residual, bool relu) {
  check_image(y, "y");
  check_bias(bias, y.size(1), y, "bias", "y");
  // The output keeps y's memory format (channels-last in, channels-last out).
  at::Tensor out = y.add(bias.view({1, -1, 1, 1}));
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_residual_crop(r, y);
    out.add_(r.narrow(2, 0, y.size(2)).narrow(3, 0, y.size(3)));
  }
  return relu ? out.clamp_min_(0) : out;
}

at::Tensor spatial_mean_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias) {
  check_image(x, "x");
  check_matrix(weight, weight.size(0), x.size(1), bias, x, "weight");
  // Linear after the mean (an exact rewrite of mean after linear): 2048 x K per image instead
  // of H*W x 2048 x K.
  return at::addmm(bias, x.mean({2, 3}), weight.t());
}

// One output row (3 * out_width values of an NHWC image) of preprocess. Rows of an NHWC uint8
// array (pixel stride 3, channel stride 1) are one contiguous run of 3 * width bytes; they are
// converted in chunks of 48 values with the (scale, shift) pattern repeated 16 times, so the inner
// loop has unit strides and no modulo, which the compiler vectorises. Other layouts (NCHW planes)
// take the strided loop.
template <typename T>
void preprocess_row(const uint8_t* src, T* dst, int64_t width, int64_t pixel_stride,
                    int64_t channel_stride, const PreprocessParams& p) {
  constexpr int64_t kChunk = 48;  // 16 pixels of 3 channels
  int64_t w = 0;
  if (pixel_stride == 3 && channel_stride == 1) {
    float scale[kChunk], shift[kChunk];
    for (int64_t k = 0; k < kChunk; ++k) {
      scale[k] = p.scale[k % 3];
      shift[k] = p.shift[k % 3];
    }
    for (; w + 16 <= width; w += 16) {
      const uint8_t* s = src + 3 * w;
      T* d = dst + 3 * w;
      for (int64_t k = 0; k < kChunk; ++k) {
        d[k] = static_cast<T>(static_cast<float>(s[k]) * scale[k] + shift[k]);
      }
    }
  }
  for (; w < width; ++w) {
    for (int64_t c = 0; c < 3; ++c) {
      const float v = static_cast<float>(src[w * pixel_stride + c * channel_stride]);
      dst[3 * w + c] = static_cast<T>(v * p.scale[c] + p.shift[c]);
    }
  }
}

// uint8 images (N, 3, H, W), any strides -> (N, 3, H', W') channels-last: (x/255 - mean)/std,
// zero padding around it. One pass over the output, parallel over output rows.
at::Tensor preprocess_cpu(const at::Tensor& images, at::ArrayRef<double> mean,
                          at::ArrayRef<double> std, at::IntArrayRef pad, at::ScalarType dtype) {
  TORCH_CHECK(images.device().is_cpu(), "bagnet_fast: preprocess: images must be on the CPU here");
  const PreprocessParams p = check_preprocess_args(images, mean, std, pad, dtype);
  at::Tensor out = preprocess_output(images, p, dtype);
  if (out.numel() == 0) return out;
  const int64_t height = images.size(2), width = images.size(3);
  const int64_t sn = images.stride(0), sc = images.stride(1), sh = images.stride(2),
                sw = images.stride(3);
  const uint8_t* in = images.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bagnet_fast::preprocess", [&] {
    scalar_t* base = out.mutable_data_ptr<scalar_t>();
    const int64_t row_values = 3 * p.out_width;
    // ~16 KiB of output per task at least: enough work to amortise a thread hand-off.
    const int64_t grain = std::max<int64_t>(1, 4096 / row_values);
    at::parallel_for(0, out.size(0) * p.out_height, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / p.out_height;
        const int64_t h = row % p.out_height - p.top;
        scalar_t* dst = base + row * row_values;
        if (h < 0 || h >= height) {
          std::fill(dst, dst + row_values, scalar_t(0));
          continue;
        }
        std::fill(dst, dst + 3 * p.left, scalar_t(0));
        preprocess_row(in + n * sn + h * sh, dst + 3 * p.left, width, sw, sc, p);
        std::fill(dst + 3 * (p.left + width), dst + row_values, scalar_t(0));
      }
    });
  });
  return out;
}

// relu(conv3x3_valid(x) + bias) with 3 input channels, the twin of the CUDA kernel: fp32
// accumulation starting from the bias, taps in (kh, kw, c) order. Parallel over output rows.
at::Tensor stem_conv_bias_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu(), "bagnet_fast: stem_conv_bias_relu: x must be on the CPU here");
  check_stem_args(x, weight, bias);
  at::Tensor out = stem_output(x, weight);
  if (out.numel() == 0) return out;
  const int64_t cout = weight.size(0), out_height = out.size(2), out_width = out.size(3);
  // taps[(kh * 3 + kw) * 3 + c][o]: one contiguous row of Cout weights per input value.
  const at::Tensor taps = weight.permute({2, 3, 1, 0}).reshape({27, cout}).to(at::kFloat).contiguous();
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  const float* tap = taps.const_data_ptr<float>();
  const float* b = bias_f.const_data_ptr<float>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bagnet_fast::stem_conv_bias_relu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();  // (N, H', W', Cout) in memory
    at::parallel_for(0, x.size(0) * out_height, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(cout);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / out_height, ho = row % out_height;
        for (int64_t wo = 0; wo < out_width; ++wo) {
          std::copy(b, b + cout, acc.begin());
          const scalar_t* window = in + n * sn + ho * sh + wo * sw;
          for (int64_t t = 0; t < 9; ++t) {
            for (int64_t c = 0; c < 3; ++c) {
              const float v = static_cast<float>(window[c * sc + (t / 3) * sh + (t % 3) * sw]);
              const float* w = tap + (t * 3 + c) * cout;
              for (int64_t o = 0; o < cout; ++o) acc[o] += v * w[o];
            }
          }
          scalar_t* y = dst + (row * out_width + wo) * cout;
          // relu that keeps NaN (as torch.relu): NaN < 0 is false.
          for (int64_t o = 0; o < cout; ++o) y[o] = static_cast<scalar_t>(acc[o] < 0.f ? 0.f : acc[o]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bagnet_fast, CPU, m) {
  m.impl("preprocess", &preprocess_cpu);
  m.impl("pointwise_bottleneck", &pointwise_bottleneck_cpu);
  m.impl("pointwise_bottleneck_", &pointwise_bottleneck_inplace_cpu);
  m.impl("bias_residual_act", &bias_residual_act_cpu);
  m.impl("spatial_mean_linear", &spatial_mean_linear_cpu);
  m.impl("stem_conv_bias_relu", &stem_conv_bias_relu_cpu);
}

// The plan passes oneDNN-prepacked weights, whose MkldnnCPU key outranks CPU in dispatch.
TORCH_LIBRARY_IMPL(bagnet_fast, MkldnnCPU, m) {
  m.impl("pointwise_bottleneck", &pointwise_bottleneck_cpu);
  m.impl("pointwise_bottleneck_", &pointwise_bottleneck_inplace_cpu);
}

}  // namespace bagnet_fast
