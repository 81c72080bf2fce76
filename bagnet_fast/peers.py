"""What a user would run instead of bagnet_fast on a CPU: ONNX Runtime and OpenVINO on the
reference graph, for ``python -m bagnet_fast bench --peers`` and the benchmark suites.

The reference graph (the authors' modules, ``BagNet.reference_forward``) is exported to ONNX once
per input shape; ONNX Runtime runs it with its full graph optimisations, OpenVINO compiles it for
the CPU in float32 (and in bfloat16 where the CPU has bf16 units). Export and compile times are
reported apart from the per-batch time. Both are optional (``pip install bagnet_fast[peers]``):
without them no peer rows appear, with a note.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

__all__ = ["PEERS", "PEER_IDS", "available_peers", "export_onnx", "peer_implementations", "peer_runner", "versions", "why_not"]


def available_peers() -> Dict[str, Optional[str]]:
    """{peer: None if installed, else why not}."""
    return {
        "onnxruntime": None if importlib.util.find_spec("onnxruntime") else "not installed (pip install onnxruntime, or bagnet_fast[peers])",
        "openvino": None if importlib.util.find_spec("openvino") else "not installed (pip install openvino, or bagnet_fast[peers])",
    }


def versions() -> Dict[str, Optional[str]]:
    """{package: installed version or None} of the peers and the exporter."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnxruntime", "openvino", "onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class _Reference(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.reference_forward(x)


def export_onnx(model: nn.Module, shape, path: str) -> float:
    """The reference graph of ``model`` for images of ``shape`` to ONNX at ``path``; seconds. The
    graph is float32, as a user exports it: a bf16 model goes out as its float32 copy (OpenVINO's
    bf16 hint converts it back)."""
    start = time.perf_counter()
    if model.conv2.weight.dtype != torch.float32:
        model = copy.deepcopy(model).float()
    example = torch.zeros(shape, dtype=torch.float32)
    # The reference graph's input checks read shapes as Python values: the tracer warns that they
    # become constants, which is what a per-shape export wants.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter: stable for this graph
        torch.onnx.export(_Reference(model).eval(), (example,), path, input_names=["images"],
                          output_names=["logits"], opset_version=18, dynamo=False)
    return time.perf_counter() - start


def _onnxruntime(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def _openvino(path: str, threads: int, precision: str, hint: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[compiled.output(0)]


def openvino_bf16_supported() -> Optional[str]:
    """None if OpenVINO's CPU plugin runs bf16 here, else why not."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return None if "BF16" in capabilities else f"this CPU has no bf16 units (OpenVINO: {', '.join(capabilities)})"


# name in bench rows -> (peer package, precision); the bench's ratios use these names.
PEERS = {
    "onnxruntime (reference graph)": ("onnxruntime", "float32"),
    "openvino fp32 (reference graph)": ("openvino", "float32"),
    "openvino bf16 (reference graph)": ("openvino", "bfloat16"),
}

# Short ids (benchmark implementation names "peer-<id>").
PEER_IDS = {"onnxruntime (reference graph)": "onnxruntime", "openvino fp32 (reference graph)": "openvino-fp32",
            "openvino bf16 (reference graph)": "openvino-bf16"}


def why_not(name: str) -> Optional[str]:
    """None if the peer ``name`` (a key of PEERS) can run here, else why not."""
    package, precision = PEERS[name]
    missing = available_peers()[package]
    if missing:
        return missing
    if package == "openvino" and precision == "bfloat16":
        return openvino_bf16_supported()
    return None


def peer_runner(name: str, model: nn.Module, shape, threads: Optional[int] = None,
                onnx_path: Optional[str] = None) -> dict:
    """{"fn" (float NCHW tensor, read as float32 -> float32 logits tensor), "precision", "setup_seconds", "note"} of the
    peer ``name`` (a key of PEERS) on the reference graph of ``model`` for inputs of ``shape``.
    The ONNX file is exported to ``onnx_path`` unless it exists (then its export is not timed)."""
    problem = why_not(name)
    if problem:
        raise RuntimeError(f"{name}: {problem}")
    threads = threads or torch.get_num_threads()
    package, precision = PEERS[name]
    export_seconds = 0.0
    if onnx_path is None:
        onnx_path = os.path.join(tempfile.mkdtemp(prefix="bagnet_fast_peers_"), "reference.onnx")
    if not os.path.exists(onnx_path):
        export_seconds = export_onnx(model, shape, onnx_path)
    start = time.perf_counter()
    if package == "onnxruntime":
        run = _onnxruntime(onnx_path, threads)
        how = f"graph optimisations ALL, {threads} threads"
    else:
        # One synchronous request at a time (what the bench and a user's loop do): LATENCY runs
        # it on every thread. THROUGHPUT splits the cores into streams meant for concurrent
        # requests, and one request then gets one stream: measured on the 2-core VM, BagNet-9
        # at batch 8 ran at 3.05 img/s under THROUGHPUT against 4.86 at batch 1 under LATENCY.
        hint = "LATENCY"
        run = _openvino(onnx_path, threads, "f32" if precision == "float32" else "bf16", hint)
        how = f"{hint}, {threads} threads"
    compile_seconds = time.perf_counter() - start
    # The graph takes float32 images: bf16 ones (a bf16 bench's) are converted here.
    return {"fn": lambda x: torch.from_numpy(run(x.float().contiguous().numpy())), "precision": precision,
            "setup_seconds": export_seconds + compile_seconds,
            "note": f"ONNX export {export_seconds:.1f} s, session/compile {compile_seconds:.1f} s, {how}"}


def peer_implementations(model: nn.Module, shape, threads: Optional[int] = None,
                         folder: Optional[str] = None, only_precision: Optional[str] = None) -> List[dict]:
    """One row {"name", "fn", "precision", "setup_seconds", "note"} per peer in PEERS (those
    computing in ``only_precision``, "float32" or "bfloat16", if given); a peer that cannot run
    here has fn None and says why in "note". One ONNX export (into ``folder``, default a
    temporary one) serves all of them; it is counted in the first row's setup."""
    folder = folder or tempfile.mkdtemp(prefix="bagnet_fast_peers_")
    path = os.path.join(folder, "bagnet_reference_{}.onnx".format("x".join(map(str, shape))))
    rows: List[dict] = []
    for name, (_, precision) in PEERS.items():
        if only_precision is not None and precision != only_precision:
            continue
        problem = why_not(name)
        if problem:
            rows.append({"name": name, "fn": None, "precision": precision, "note": f"not run: {problem}"})
            continue
        rows.append({"name": name, **peer_runner(name, model, shape, threads, path)})
    return rows
