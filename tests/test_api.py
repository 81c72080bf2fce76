"""accelerate(), checkpoint loading, bad input and the backend report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bagnet_fast
from bagnet_fast import weights
from conftest import FP32_RTOL, make_model, rel_err


@pytest.fixture(scope="module")
def source():
    return make_model("bagnet17", num_classes=10)


def _check_fast(fast, source, x=None):
    x = torch.randn(2, 3, 40, 45) if x is None else x
    with torch.no_grad():
        expected = source.reference_forward(x)
    actual = fast(x)  # no torch.no_grad(): accelerate() froze the parameters
    assert not actual.requires_grad
    assert rel_err(actual, expected) <= FP32_RTOL
    assert bagnet_fast.get_plan(fast).backend.name == "cpu"


def test_accelerate_module(source):
    _check_fast(bagnet_fast.accelerate(source), source)


def test_accelerate_foreign_module_with_reference_architecture(source):
    """The authors' class is another class with the same modules: only its structure counts."""

    class AuthorsBagNet(nn.Module):
        def __init__(self, model):
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, copy_module(child))
            self.avg_pool = True

    def copy_module(module):
        import copy

        return copy.deepcopy(module)

    _check_fast(bagnet_fast.accelerate(AuthorsBagNet(source)), source)


def test_accelerate_dataparallel(source):
    _check_fast(bagnet_fast.accelerate(nn.DataParallel(source)), source)


@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "state_dict", "model_state_dict"])
def test_accelerate_state_dict_forms(source, wrap, tmp_path):
    state = source.state_dict()
    if wrap == "module_prefix":
        state = {"module." + k: v for k, v in state.items()}
    elif wrap != "plain":
        state = {wrap: state, "epoch": 3}
    _check_fast(bagnet_fast.accelerate(state), source)
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    _check_fast(bagnet_fast.accelerate(str(path)), source)


def test_accelerate_infers_variant(source):
    fast = bagnet_fast.accelerate(source.state_dict())
    assert fast.patch_size == 17
    assert fast.fc.out_features == 10


def test_accelerate_rejects_non_bagnet():
    with pytest.raises(ValueError, match="not a BagNet"):
        bagnet_fast.accelerate({"fc.weight": torch.zeros(2, 2048), "fc.bias": torch.zeros(2)})
    with pytest.raises(TypeError, match="accelerate"):
        bagnet_fast.accelerate(42)


def test_accelerate_with_unavailable_backend_says_why(source):
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        bagnet_fast.accelerate(source, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: .*float32"):
        bagnet_fast.accelerate(copy.deepcopy(source).double(), backend="cpu")


def test_builder_loads_local_weights(source, tmp_path):
    path = tmp_path / "weights.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = bagnet_fast.bagnet17(weights=str(path), num_classes=10).eval()
    x = torch.randn(1, 3, 17, 17)
    with torch.no_grad():
        assert rel_err(model(x), source.reference_forward(x)) <= FP32_RTOL


def test_missing_and_corrupt_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        bagnet_fast.bagnet9(weights=str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read .*corrupt.pth"):
        bagnet_fast.bagnet9(weights=str(corrupt))
    with pytest.raises(ValueError, match="either pretrained"):
        bagnet_fast.bagnet9(pretrained=True, weights=str(corrupt))


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch.hub cache for one test."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


def _publish(monkeypatch, name, path):
    """Pretend the published file of ``name`` is ``path``: its URL carries path's sha256 prefix."""
    import hashlib

    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    url = f"https://example.invalid/bagnet-{prefix}.pth.tar"
    monkeypatch.setitem(weights.PRETRAINED_URLS, name, url)
    return url, prefix


def test_pretrained_offline_error_names_url_and_remedy(monkeypatch, hub_dir):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        bagnet_fast.bagnet33(pretrained=True)
    message = str(info.value)
    assert weights.PRETRAINED_URLS["bagnet33"] in message
    assert "weights=PATH" in message and str(hub_dir / "bagnet32-2ddd53ed.pth.tar") in message


def test_pretrained_downloads_once_and_checks_hash_on_every_load(monkeypatch, hub_dir, source, tmp_path):
    published = tmp_path / "published.pth"
    torch.save(source.state_dict(), published)
    url, prefix = _publish(monkeypatch, "bagnet17", published)
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        import shutil

        shutil.copyfile(published, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        model = bagnet_fast.bagnet17(pretrained=True, num_classes=10)
    assert downloads == [(url, prefix)]  # the second load used the cache
    assert torch.equal(model.fc.weight, source.fc.weight)
    # The cached file changes (a truncated copy, a planted file): refused, whatever its content.
    cached = hub_dir / f"bagnet-{prefix}.pth.tar"
    cached.write_bytes(published.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match=f"sha256 is .*promises {prefix}.*Delete it"):
        bagnet_fast.bagnet17(pretrained=True, num_classes=10)


class _RunsCode:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pretrained_never_runs_code_from_the_cache(monkeypatch, hub_dir, tmp_path):
    """A malicious pickle planted at the cache path runs nothing: its hash is wrong, and even with
    a matching hash prefix (8 hex digits can be brute-forced) it is read with weights_only=True."""
    marker = tmp_path / "pwned"
    hub_dir.mkdir(parents=True)
    planted = hub_dir / "bagnet8-34f4ccd2.pth.tar"
    torch.save({"conv1.weight": _RunsCode(marker)}, planted)
    with pytest.raises(RuntimeError, match="is not the published bagnet9 checkpoint"):
        bagnet_fast.bagnet9(pretrained=True)
    assert not marker.exists()
    _publish(monkeypatch, "bagnet9", planted)  # now the hash matches
    planted.rename(weights.pretrained_path("bagnet9"))
    with pytest.raises(ValueError, match="not a checkpoint of tensors.*model.state_dict"):
        bagnet_fast.bagnet9(pretrained=True)
    assert not marker.exists()


def test_whole_model_pickle_is_refused_with_advice(tmp_path, source):
    path = tmp_path / "model.pth"
    torch.save(source, path)
    with pytest.raises(ValueError, match=r"torch.save\(model.state_dict\(\), path\)") as info:
        bagnet_fast.accelerate(str(path))
    assert "weights_only=False" not in str(info.value).split("(torch said")[0]


def test_state_dict_with_a_non_tensor_entry_loads_with_a_warning(source):
    state = dict(source.state_dict(), epoch=7)
    with pytest.warns(UserWarning, match="not tensors: {'epoch': 'int'}"):
        fast = bagnet_fast.accelerate(state)
    _check_fast(fast, source)


@pytest.mark.parametrize(
    "x, error, pattern",
    [
        (torch.randn(3, 40, 40), ValueError, "4-D"),
        (torch.randn(1, 1, 40, 40), ValueError, "3 colour channels"),
        (torch.randn(1, 40, 40, 3), ValueError, "channels-last"),
        (torch.zeros(1, 3, 40, 40, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.randn(1, 3, 32, 40), ValueError, "at least 33x33"),
        (torch.randn(1, 3, 40, 40, dtype=torch.float64), TypeError, "float64 but the model is torch.float32"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_error(x, error, pattern, models):
    with pytest.raises(error, match=pattern), torch.no_grad():
        models["bagnet33"](x)


def test_backend_report():
    report = bagnet_fast.backends()
    assert report["cpu"]["available"] is True
    assert report["torch"]["available"] is True
    assert report["cuda"]["available"] is False and report["cuda"]["reason"]
    assert bagnet_fast.backends("cpu", torch.float64)["cpu"]["reason"].startswith("the cpu backend computes in float32")
