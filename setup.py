"""Build bagnet_fast and its C++/CUDA extension ``bagnet_fast._C``.

Environment flags (printed at build time):
  BAGNET_FAST_CUDA=auto|1|0   build the CUDA sources: auto (default) when torch is a CUDA build and
                              nvcc is found (no GPU needed), 1 to require it, 0 to skip it.
  TORCH_CUDA_ARCH_LIST        CUDA architectures, default "8.0;9.0" (A100, H100/H200).
  MAX_JOBS                    parallel compile jobs (ninja).
"""

import glob
import os

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the nvcc on PATH; where that is a link (/usr/local/bin/nvcc) the
# guess lacks the headers. Prefer the toolkit's own folder when it exists.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))


def _want_cuda() -> bool:
    flag = os.environ.get("BAGNET_FAST_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                "BAGNET_FAST_CUDA=1 but the CUDA part cannot be built: torch.version.cuda="
                f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    if flag != "auto":
        raise ValueError(f"BAGNET_FAST_CUDA must be auto, 1 or 0, not {flag!r}")
    return possible


def _pip_cuda_include_dirs():
    """Headers of the pip-installed CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's CUDA
    headers include; a minimal toolkit (nvcc + runtime) lacks them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")))


def _extension():
    with_cuda = _want_cuda()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
    nvcc_flags = ["-O3", "-lineinfo"]
    print(
        "bagnet_fast build: torch {} (CUDA {}), CUDA_HOME={}, CUDA sources: {}, arch list: {}, "
        "MAX_JOBS={}".format(
            torch.__version__,
            torch.version.cuda,
            cpp_extension.CUDA_HOME,
            "yes" if with_cuda else "no",
            os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else "-",
            os.environ.get("MAX_JOBS", "default"),
        ),
        flush=True,
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "bagnet_fast._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("BAGNET_FAST_WITH_CUDA", "1")],
            include_dirs=_pip_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    return cpp_extension.CppExtension(
        "bagnet_fast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}
    )


setup(
    packages=find_packages(include=["bagnet_fast", "bagnet_fast.*"]) + ["bagnet_fast.kernels"],
    package_dir={"bagnet_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
