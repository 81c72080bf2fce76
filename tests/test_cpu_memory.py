"""The cpu backend's allocator setting (bagnet_fast/executors/cpu_memory.py): applied once when a
cpu-backend plan is built, opted out of with BAGNET_FAST_CPU_MALLOC=system, the caching allocator
chosen with =cache, a bad value refused; and the caching allocator itself.
Each case runs in a fresh process: the setting is process-wide and applied once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bagnet_fast.ops import has_op

SCRIPT = """
import torch, bagnet_fast
from bagnet_fast.executors import cpu_memory
print(cpu_memory.state())
model = bagnet_fast.bagnet9(num_classes=3).eval()
with torch.no_grad():
    model(torch.randn(1, 3, 20, 20))
print(bagnet_fast.get_plan(model).backend.name)
print(cpu_memory.state())
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not has_op("pointwise_bottleneck", "CPU"),
                                reason="glibc's mallopt and the cpu backend (C++ extension) are needed")


def _run(setting):
    env = dict(os.environ)
    env.pop("BAGNET_FAST_CPU_MALLOC", None)
    if setting is not None:
        env["BAGNET_FAST_CPU_MALLOC"] = setting
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)


def test_applied_when_the_cpu_backend_first_runs():
    result = _run(None)
    assert result.returncode == 0, result.stderr
    before, backend, after = result.stdout.strip().splitlines()[-3:]
    assert before.startswith("not applied yet") and backend == "cpu"
    assert "freed large blocks kept for reuse" in after


def test_system_opts_out_and_bad_values_are_refused():
    result = _run("system")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "the system allocator's defaults (BAGNET_FAST_CPU_MALLOC=system)"
    result = _run("sometimes")
    assert result.returncode != 0 and "BAGNET_FAST_CPU_MALLOC='sometimes'" in result.stderr


def test_cache_chooses_the_caching_allocator_for_the_cpu_backend():
    result = _run("cache")
    assert result.returncode == 0, result.stderr
    before, backend, after = result.stdout.strip().splitlines()[-3:]
    assert before.startswith("not applied yet") and backend == "cpu"
    assert after.startswith("bagnet_fast's caching allocator (BAGNET_FAST_CPU_MALLOC=cache")
    code = ("import os, torch, bagnet_fast; os.environ['BAGNET_FAST_CPU_MALLOC'] = 'cache'; "
            "from bagnet_fast.executors import cpu_memory as cm; cm.keep_freed_memory(); "
            "print(cm.caching_allocator_stats()['installed'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


def test_public_call_applies_it_once_before_any_plan():
    code = ("import bagnet_fast; a = bagnet_fast.keep_freed_cpu_memory(); b = bagnet_fast.keep_freed_cpu_memory(); "
            "print(a == b and 'kept for reuse' in a)")
    env = {k: v for k, v in os.environ.items() if k != "BAGNET_FAST_CPU_MALLOC"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


# --------------------------------------------------------------------------- the caching allocator
# (csrc/cpu/caching_allocator.cpp; process-wide, so each case runs in a fresh process)

CACHING = """
import copy, torch, bagnet_fast
from bagnet_fast.executors import cpu_memory as cm
torch.manual_seed(0)
model = bagnet_fast.bagnet17(num_classes=5).train()
x = torch.randn(2, 3, 96, 96)
kept_before = torch.randn(3 << 18)  # 3 MiB from c10's allocator, freed after the switch
onednn_before = torch.randn(1 << 20).to_mkldnn()  # oneDNN's raw_allocate before, raw_deallocate after

def step(model):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach().clone(), [p.grad.clone() for p in model.parameters()]

reference = copy.deepcopy(model)
expected = step(reference)
stats = bagnet_fast.enable_cpu_caching_allocator()
assert stats["installed"] and stats["enabled"] and stats["live_bytes"] == 0, stats
del kept_before, onednn_before

# A freed block is handed out again to a request of the same size.
a = torch.empty(3 << 20, dtype=torch.uint8)
pointer = a.data_ptr()
del a
b = torch.empty(3 << 20, dtype=torch.uint8)
assert b.data_ptr() == pointer and cm.caching_allocator_stats()["hits"] == 1
del b

# Training steps under it: the same values bit for bit, blocks reused, the bound kept.
for _ in range(2):
    got = step(model)
    assert torch.equal(got[0], expected[0]) and all(torch.equal(g, e) for g, e in zip(got[1], expected[1]))
    expected = step(reference)
stats = cm.caching_allocator_stats()
assert stats["hits"] > stats["misses"] > 0, stats
assert stats["live_bytes"] + stats["cached_bytes"] <= stats["bound_bytes"], stats
assert stats["peak_live_bytes"] <= stats["bound_bytes"], stats

# The cpu backend's plan (oneDNN buffers through raw_allocate/raw_deallocate) under it.
model.eval()
with torch.no_grad():
    fast, oracle = model(x), model.reference_forward(x)
assert bagnet_fast.get_plan(model).backend.name == "cpu"
assert (fast - oracle).abs().max().item() <= 1e-4 * oracle.abs().max().item()
del fast, oracle

# A forked child (a DataLoader worker) allocates and frees through it.
import os
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP pool does not survive fork
    t = torch.ones(4 << 20, dtype=torch.uint8)
    os._exit(0 if int(t.sum()) == 4 << 20 else 1)
assert os.waitpid(pid, 0)[1] == 0

cached = cm.caching_allocator_stats()["cached_bytes"]
assert cached > 0 and cm.empty_cache() == cached and cm.caching_allocator_stats()["cached_bytes"] == 0
cm.reset_peak_stats()
live = cm.caching_allocator_stats()["live_bytes"]
assert cm.caching_allocator_stats()["peak_live_bytes"] == live

# Disabled: nothing kept, new blocks from c10's allocator, old ones still freed correctly.
c = torch.empty(5 << 20, dtype=torch.uint8)
stats = cm.disable_caching_allocator()
assert not stats["enabled"] and stats["installed"] and stats["live_bytes"] == live + (6 << 20)
d = torch.empty(5 << 20, dtype=torch.uint8)
del c, d
stats = cm.caching_allocator_stats()
assert stats["live_bytes"] == live and stats["cached_bytes"] == 0, stats
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the caching allocator maps memory with mmap (Linux)")
def test_caching_allocator_reuses_blocks_keeps_its_bound_and_changes_no_value():
    result = subprocess.run([sys.executable, "-c", CACHING], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


PEAKS = """
import sys, torch, bagnet_fast
from bagnet_fast.executors import cpu_memory as cm
bagnet_fast.enable_cpu_caching_allocator()
recompute = sys.argv[1]
torch.manual_seed(0)
model = bagnet_fast.bagnet17(num_classes=5).train()
if recompute != "none":
    model.set_grad_checkpointing(True, recompute=recompute)
x = torch.randn(2, 3, 128, 128)
model(x).sum().backward()  # warm-up: gradients and oneDNN buffers exist from here on
model.zero_grad(set_to_none=True)
cm.reset_peak_stats()
base = cm.caching_allocator_stats()["live_bytes"]  # parameters, the batch
model(x).sum().backward()
print(cm.caching_allocator_stats()["peak_live_bytes"] - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the caching allocator maps memory with mmap (Linux)")
def test_block_checkpointing_has_the_lowest_peak_of_live_memory():
    """The peak of live blocks (>= 1 MiB, counted by the caching allocator) of one training step
    above the parameters and the batch:
    per-block recomputation below per-stage below none (measured at this small size, where the
    gradients of the parameters are a large fixed part: block 155 MB, stage 199, none 254; at
    batch 8, 224 px the live peaks are 0.35x and 0.52x, benchmarks/results/)."""
    peaks = {}
    for recompute in ("none", "stage", "block"):
        result = subprocess.run([sys.executable, "-c", PEAKS, recompute], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        peaks[recompute] = int(result.stdout.strip().splitlines()[-1])
    assert peaks["block"] < 0.85 * peaks["stage"] and peaks["stage"] < 0.85 * peaks["none"], peaks
