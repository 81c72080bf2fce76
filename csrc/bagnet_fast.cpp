// Operator schemas of the bagnet_fast library and the Python module that loads them.
//
// The schemas are defined once here; csrc/cpu and csrc/cuda register implementations for their
// dispatch keys, and bagnet_fast/ops registers the fake (meta) kernels in Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(bagnet_fast, m) {
  // A whole 1x1-only bottleneck per pixel (x: (N, C, H, W) channels-last; 1x1 conv weights
  // w1 (p, C, 1, 1), w2 (p, p, 1, 1), w3 (C, p, 1, 1)): relu(W3 relu(W2 relu(W1 x + b1) + b2) + b3 + x).
  m.def(
      "pointwise_bottleneck(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, "
      "Tensor b3) -> Tensor");
  // The same, writing the result into x (the inference plan owns its activations).
  m.def(
      "pointwise_bottleneck_(Tensor(a!) x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor w3, Tensor b3) -> ()");
  // act(y + bias + residual[:, :, :H, :W]) for y (N, C, H, W) and residual (N, C, >=H, >=W).
  m.def("bias_residual_act(Tensor y, Tensor bias, Tensor? residual, bool relu) -> Tensor");
  // The avg_pool=True head: linear(mean of x over H and W): (N, C, H, W) -> (N, K).
  m.def("spatial_mean_linear(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  // The input pipeline: uint8 images (N, 3, H, W) of any strides (an (N, H, W, 3) array permuted
  // is a channels-last view) -> (N, 3, H + top + bottom, W + left + right) channels-last in
  // `dtype`: (x / 255 - mean[c]) / std[c] inside, zeros in the padding (pad = [top, bottom,
  // left, right], applied after normalisation, as the dense heatmap needs). One read, one write.
  m.def(
      "preprocess(Tensor images, float[] mean, float[] std, int[] pad, ScalarType dtype) -> "
      "Tensor");
  // The merged stem: relu(conv_valid(x, weight) + bias), stride 1, for x (N, 3, H, W) of any
  // strides and weight (Cout, 3, 3, 3) -> (N, Cout, H - 2, W - 2) channels-last. A direct
  // convolution in fp32: 27 products per output, too few and too narrow (3 input channels) for
  // the tiles of a GEMM, and the bias and ReLU applied before the only write of the widest
  // early map.
  m.def("stem_conv_bias_relu(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  // What the freshness check of a cached plan compares, per tensor: (data pointer, version
  // counter or -1 for inference tensors, dtype, device, hash of `samples` evenly spaced values
  // of a CPU tensor, else 0) -> (len(tensors), 5) int64 on the CPU. Reads no device memory.
  m.def("tensor_states(Tensor[] tensors, int samples) -> Tensor");
}

namespace bagnet_fast {
PyObject* tensor_states_list(PyObject* module, PyObject* args);  // csrc/plan_state.cpp
// csrc/cpu/caching_allocator.cpp
PyObject* cpu_caching_allocator_set(PyObject* module, PyObject* args);
PyObject* cpu_caching_allocator_stats(PyObject* module, PyObject* args);
PyObject* cpu_caching_allocator_empty_cache(PyObject* module, PyObject* args);
PyObject* cpu_caching_allocator_reset_peak(PyObject* module, PyObject* args);
}

static PyMethodDef bagnet_fast_methods[] = {
    {"tensor_states_list", bagnet_fast::tensor_states_list, METH_VARARGS,
     "tensor_states_list(tensors: list, samples: int) -> Tensor: tensor_states without the dispatcher"},
    {"cpu_caching_allocator_set", bagnet_fast::cpu_caching_allocator_set, METH_VARARGS,
     "cpu_caching_allocator_set(enabled: bool, huge_pages: bool): install (once) / configure it"},
    {"cpu_caching_allocator_stats", bagnet_fast::cpu_caching_allocator_stats, METH_NOARGS,
     "cpu_caching_allocator_stats() -> dict"},
    {"cpu_caching_allocator_empty_cache", bagnet_fast::cpu_caching_allocator_empty_cache, METH_NOARGS,
     "cpu_caching_allocator_empty_cache() -> int: bytes unmapped"},
    {"cpu_caching_allocator_reset_peak", bagnet_fast::cpu_caching_allocator_reset_peak, METH_NOARGS,
     "cpu_caching_allocator_reset_peak() -> None"},
    {nullptr, nullptr, 0, nullptr}};

// `import bagnet_fast._C` loads this library, which registers the operators above.
static struct PyModuleDef bagnet_fast_module = {
    PyModuleDef_HEAD_INIT, "_C", "bagnet_fast operators (registered as torch.ops.bagnet_fast)", -1,
    bagnet_fast_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&bagnet_fast_module);
  if (module == nullptr) return nullptr;
#ifdef BAGNET_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
