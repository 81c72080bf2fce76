"""bagnet_fast.certify against an oracle: a straightforward per-image loop implementation of the
PatchGuard family's algorithms, written here from the papers' pseudo-code (PatchGuard's
Algorithms 1 and 2, Clipped BagNet's bound, PatchGuard++'s detection rule).

The oracle follows the same numeric policy as the library (docs/certify.md): float64 from the
start, the evidence outside a window summed over the cells outside it (the pseudo-code's
u * (1 - w)), ties broken by the reference code's rules. Maps come in kinds that make ties
common and exact (quantised values: every sum is exact in any order) or improbable (continuous
values), plus all-negative maps, maps whose evidence lies inside one window, maps equal to the
window, windows of 1 and rectangular windows. Predictions and codes must be identical.

benchmarks/certify_speed.py times this oracle against the batched functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bagnet_fast import certify as cf

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- the oracle ------------------------------------------------------------------------------


def _stable_top(values: np.ndarray) -> int:
    """The reference's ``np.argsort(values, kind='stable')[-1]``: highest index among maxima."""
    return int(np.argsort(values, kind="stable")[-1])


def _windows(height, width, wy, wx):
    return [(i, j) for i in range(height - wy + 1) for j in range(width - wx + 1)]


def _outside(u: np.ndarray, i: int, j: int, wy: int, wx: int) -> np.ndarray:
    """Per-class evidence with window (i, j) zeroed: SUM(u * (1 - w))."""
    masked = u.copy()
    masked[i : i + wy, j : j + wx] = 0
    return masked.sum(axis=(0, 1))


def _window_sums(u, wy, wx):
    height, width = u.shape[:2]
    sums = np.zeros((height - wy + 1, width - wx + 1) + u.shape[2:])
    for i, j in _windows(height, width, wy, wx):
        sums[i, j] = u[i : i + wy, j : j + wx].sum(axis=(0, 1))
    return sums


def oracle_masking(x: np.ndarray, label, window, clip=None, threshold=0.0):
    """PatchGuard robust masking of one (H, W, C) map: (defended prediction, code or None)."""
    wy, wx = window
    u = np.clip(x.astype(np.float64), 0, np.inf if clip is None else clip)
    height, width, classes = u.shape
    totals = u.sum(axis=(0, 1))
    sums = _window_sums(u, wy, wx)
    # Algorithm 1: mask each class's largest window when it holds more than T of the class.
    masked = totals.copy()
    for c in range(classes):
        largest = sums[:, :, c].max()
        if totals[c] > 0 and largest / totals[c] > threshold:
            i, j = np.unravel_index(np.argmax(sums[:, :, c]), sums.shape[:2])
            masked[c] = _outside(u[:, :, c : c + 1], i, j, wy, wx)[0]
    prediction = _stable_top(masked)
    if label is None:
        return prediction, None
    # Algorithm 2.
    if _stable_top(totals) != label:
        return prediction, 0
    truth = u[:, :, label]
    for i, j in _windows(height, width, wy, wx):
        bound = _outside(u, i, j, wy, wx) / (1 - threshold)  # wrong classes: t / (1 - T)
        rest = truth.copy()
        rest[i : i + wy, j : j + wx] = 0
        recomputed = sums[:, :, label].copy()
        overlap = 0.0
        for ii, jj in _windows(height, width, wy, wx):
            if abs(ii - i) < wy and abs(jj - j) < wx:  # the windows the mask touches
                recomputed[ii, jj] = rest[ii : ii + wy, jj : jj + wx].sum()
                overlap = max(overlap, recomputed[ii, jj])
        largest, remaining = recomputed.max(), rest.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            detected = largest / remaining > threshold
        bound[label] = remaining - (largest if detected else overlap)
        if _stable_top(bound) != label:
            return prediction, 1
    return prediction, 2


def _clipped(x, clip):
    x = x.astype(np.float64)
    return np.tanh(x * 0.05 - 1.0) if clip is None else np.clip(x, 0, clip)


def oracle_clipping(x: np.ndarray, label, window, clip=None, sound=False):
    """Clipped BagNet (clip None) or [0, clip] clipping of one map: (prediction, code or None)."""
    wy, wx = window
    f = _clipped(x, clip)
    height, width, classes = f.shape
    means = f.sum(axis=(0, 1)) / (height * width)
    prediction = int(np.argmax(means))  # lowest index among ties
    if label is None:
        return prediction, None
    if prediction != label:
        return prediction, 0
    gain = wy * wx * (2 if clip is None else clip)
    if sound:
        rivals = [c for c in range(classes) if c != label]
    else:
        others = means.copy()
        others[prediction] = -np.inf
        rivals = [int(np.argmax(others))]
    for rival in rivals:
        difference = f[:, :, label] - f[:, :, rival]
        for i, j in _windows(height, width, wy, wx):
            outside = _outside(difference[:, :, None], i, j, wy, wx)[0]
            if outside < gain or (sound and outside == gain and rival < label):
                return prediction, 1
    return prediction, 2


def oracle_detection(x: np.ndarray, label, window, tau):
    """PatchGuard++ on one map: (prediction, -1 = alert; code or None)."""
    wy, wx = window
    logits = x.astype(np.float64)
    height, width, _ = logits.shape
    overall = _stable_top(logits.sum(axis=(0, 1)) / (height * width))
    alert, lost = False, False
    for i, j in _windows(height, width, wy, wx):
        scores = _outside(logits, i, j, wy, wx) / (height * width)
        shifted = np.exp(scores - scores.max())
        probabilities = shifted / shifted.sum()
        masked, confidence = int(np.argmax(probabilities)), probabilities.max()
        alert |= masked != overall and confidence > tau
        lost |= masked != label or confidence < tau
    prediction = -1 if alert else overall
    if label is None:
        return prediction, None
    return prediction, 0 if overall != label else (1 if lost else 2)


ORACLES = {"masking": oracle_masking, "clipping": oracle_clipping, "detection": oracle_detection}
DEFENCES = {"masking": cf.masking, "clipping": cf.clipping, "detection": cf.detection}


def run_oracle(name, maps: np.ndarray, labels, window, **options):
    results = [ORACLES[name](m, None if labels is None else int(y), window, **options)
               for m, y in zip(maps, labels if labels is not None else [None] * len(maps))]
    return np.array([p for p, _ in results]), np.array([c for _, c in results])


# --- random maps -----------------------------------------------------------------------------

KINDS = ("quarters", "halves", "normal", "negative", "inside-window")


def random_maps(rng: np.random.Generator, count, height, width, classes, kind, window, permute=True):
    """(count, H, W, C) float32 maps of one kind, with planted ties, and labels. ``permute``:
    plant classes whose cells are a permutation of another's (equal totals; exact only where
    the evidence is dyadic, so not for CBN's tanh, whose sums round in any order)."""
    shape = (count, height, width, classes)
    if kind == "quarters":  # multiples of 1/4: exact sums, frequent ties
        maps = rng.integers(-12, 16, shape) / 4
    elif kind == "halves":  # five values: ties everywhere
        maps = rng.integers(-2, 3, shape) / 2
    elif kind == "normal":  # continuous: exact ties improbable
        maps = rng.standard_normal(shape) * rng.choice([0.5, 2.0]) + rng.choice([0.0, 1.0])
    elif kind == "negative":  # nothing survives clipping to [0, c]
        maps = -rng.random(shape) - 0.25
    else:  # all positive evidence inside one window per map
        wy, wx = window
        maps = -rng.random(shape)
        for n in range(count):
            i, j = rng.integers(0, height - wy + 1), rng.integers(0, width - wx + 1)
            maps[n, i : i + wy, j : j + wx] = rng.integers(0, 9, (wy, wx, classes)) / 4
    labels = rng.integers(0, classes, count)
    for n in range(count):
        plant = rng.integers(0, 4)
        if plant == 1:  # a duplicated class: exact ties everywhere between the two
            a, b = rng.choice(classes, 2, replace=False)
            maps[n, ..., b] = maps[n, ..., a]
        elif plant == 2 and permute:  # the label's map is a rival's cells permuted: equal totals
            rival = (labels[n] + 1) % classes
            maps[n, ..., labels[n]] = rng.permutation(maps[n, ..., rival].reshape(-1)).reshape(height, width)
        elif plant == 3 and kind != "negative":  # a stronger true class: the analysis runs to the end
            maps[n, ..., labels[n]] += rng.choice([0.5, 1.0, 2.0])
    return maps.astype(np.float32), labels


def random_cases(seed, groups, max_side=7, max_classes=5, permute=True):
    """(maps, labels, window, kind) groups of random geometry: windows from 1 to the whole map,
    square and rectangular."""
    rng = np.random.default_rng(seed)
    for g in range(groups):
        height, width = rng.integers(1, max_side + 1, 2)
        classes = int(rng.integers(2, max_classes + 1))
        if g % 5 == 0:
            window = (int(height), int(width))  # the window is the whole map
        elif g % 5 == 1:
            window = (1, 1)
        else:
            window = (int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1)))
        kind = KINDS[g % len(KINDS)]
        maps, labels = random_maps(rng, 12, int(height), int(width), classes, kind, window, permute)
        yield maps, labels, window, kind


def _assert_same(name, maps, labels, window, ours, oracle_options):
    expected_prediction, expected_codes = run_oracle(name, maps, labels, window, **oracle_options)
    prediction = ours.prediction.cpu().numpy()
    bad = np.flatnonzero(prediction != expected_prediction)
    assert bad.size == 0, f"{name} {oracle_options} window {window}: predictions differ at {bad[:5]}: " \
                          f"{prediction[bad[:5]]} vs oracle {expected_prediction[bad[:5]]}"
    codes = ours.certified.cpu().numpy()
    bad = np.flatnonzero(codes != expected_codes)
    assert bad.size == 0, f"{name} {oracle_options} window {window}: codes differ at {bad[:5]}: " \
                          f"{codes[bad[:5]]} vs oracle {expected_codes[bad[:5]]}"
    return codes


def _check_coverage(codes, predictions=None):
    """The random cases must reach every outcome, or the comparison proves little."""
    counts = np.bincount(np.concatenate(codes), minlength=3)
    assert (counts > 20).all(), f"code counts {counts}: the cases do not exercise every outcome"


# --- agreement with the oracle ---------------------------------------------------------------


@pytest.mark.parametrize("clip, threshold", [(None, 0.0), (None, 0.25), (1.0, 0.0), (1.5, 0.5)])
def test_masking_matches_oracle(clip, threshold):
    codes = []
    for maps, labels, window, _ in random_cases(seed=1 + int(threshold * 100) + int(clip or 0), groups=50):
        result = cf.masking(torch.from_numpy(maps), labels, window, clip=clip, threshold=threshold)
        codes.append(_assert_same("masking", maps, labels, window, result, dict(clip=clip, threshold=threshold)))
    _check_coverage(codes)


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_masking_below_the_threshold_matches_oracle(threshold):
    """Larger maps with spread evidence: after masking the attacker's window, the largest window
    often holds at most T of the rest, so the true class's bound subtracts the largest window
    that overlaps the mask instead (the reference's else branch, commit 8c4a05a)."""
    rng = np.random.default_rng(30 + int(threshold * 100))
    codes = []
    for group in range(12):
        height, width = rng.integers(9, 13, 2)
        window = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        maps = (rng.integers(0, 9, (10, height, width, 4)) / 4).astype(np.float32)
        labels = rng.integers(0, 4, 10)
        maps[np.arange(10), :, :, labels] += np.float32(rng.choice([0.0, 0.25, 0.5], 10))[:, None, None]
        result = cf.masking(torch.from_numpy(maps), labels, window, threshold=threshold)
        codes.append(_assert_same("masking", maps, labels, window, result, dict(clip=None, threshold=threshold)))
    _check_coverage(codes)


@pytest.mark.parametrize("clip, sound", [(None, False), (None, True), (1.0, False), (2.0, True)])
def test_clipping_matches_oracle(clip, sound):
    codes = []
    for maps, labels, window, _ in random_cases(seed=20 + int(sound) + int(clip or 0), groups=50, permute=clip is not None):
        if clip is None:
            # CBN's evidence lies in (-1, 1): quarter logits make margins of a few units, so that
            # the 2 w^2 gain is reachable; a larger spread then certifies some images.
            maps = maps * np.float32(40.0)
        result = cf.clipping(torch.from_numpy(maps), labels, window, clip=clip, sound=sound)
        codes.append(_assert_same("clipping", maps, labels, window, result, dict(clip=clip, sound=sound)))
    _check_coverage(codes)


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8])
def test_detection_matches_oracle(tau):
    codes, alerts = [], 0
    for maps, labels, window, _ in random_cases(seed=40 + int(tau * 10), groups=50):
        maps = maps * np.float32(4.0)  # larger logit gaps: confident masked predictions (exact: x4)
        result = cf.detection(torch.from_numpy(maps), labels, window, tau)
        codes.append(_assert_same("detection", maps, labels, window, result, dict(tau=tau)))
        alerts += int((result.prediction == cf.ALERT).sum())
    _check_coverage(codes)
    assert alerts > 10


def _imagenet_sized_maps(count, seed, boost):
    """BagNet-17 at 224: 26 x 26 x 1000, the true class stronger by ``boost``."""
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((count, 26, 26, 1000)).astype(np.float32)
    labels = rng.integers(0, 1000, count)
    maps[np.arange(count), :, :, labels] += np.asarray(boost, dtype=np.float32)[:, None, None]
    return maps, labels


def test_imagenet_sized_maps_match_oracle():
    """A handful at full size: 26 x 26 x 1000 with window 6, from certified to vulnerable."""
    maps, labels = _imagenet_sized_maps(4, seed=7, boost=[10.0, 0.3, 0.2, 0.0])
    logits = torch.from_numpy(maps)
    codes = _assert_same("masking", maps, labels, (6, 6), cf.masking(logits, labels, 6), dict(clip=None, threshold=0.0))
    assert sorted(set(codes)) == [0, 1, 2]
    _assert_same("masking", maps[:2], labels[:2], (6, 6), cf.masking(logits[:2], labels[:2], 6, clip=2.0, threshold=0.2),
                 dict(clip=2.0, threshold=0.2))
    strong = logits * 60
    _assert_same("clipping", maps * 60, labels, (6, 6), cf.clipping(strong, labels, 6), dict(clip=None, sound=False))
    codes = _assert_same("detection", maps, labels, (6, 6), cf.detection(logits, labels, 6, 0.5), dict(tau=0.5))
    assert sorted(set(codes)) == [0, 1, 2]


def test_sound_clipping_with_many_classes():
    """sound=True examines every class (1000 here, on a small map to keep the oracle quick)."""
    rng = np.random.default_rng(3)
    maps = (rng.standard_normal((8, 8, 8, 1000)) * 40).astype(np.float32)
    labels = rng.integers(0, 1000, 8)
    maps[np.arange(8), :, :, labels] += np.float32([400, 60, 35, 30, 20, 15, 10, 0])[:, None, None]
    result = cf.clipping(torch.from_numpy(maps), labels, 3, sound=True)
    codes = _assert_same("clipping", maps, labels, (3, 3), result, dict(clip=None, sound=True))
    assert {0, 1, 2} <= set(codes)


def test_sound_finds_the_class_the_runner_up_check_misses():
    """CBN's reference check looks at the runner-up only. Here the runner-up r keeps a margin of
    8.4 > 2 w^2 = 8 outside every window, but a third class c with a lower mean loses all its
    evidence inside window (0, 0) and keeps only 7.2 there: a patch there can make c win."""
    logit = lambda f: np.float32((np.arctanh(f) + 1.0) / 0.05)  # noqa: E731 - inverse of tanh(0.05 x - 1)
    maps = np.empty((1, 4, 4, 3), np.float32)
    maps[0, ..., 0] = logit(0.5)  # the true class
    maps[0, ..., 1] = logit(-0.2)  # the runner-up: mean -0.2
    maps[0, ..., 2] = logit(-0.1)  # c: mean (12 * -0.1 - 4) / 16 = -0.325
    maps[0, :2, :2, 2] = -2000.0  # f = -1
    logits = torch.from_numpy(maps)
    assert int(cf.clipping(logits, [0], 2).certified) == cf.CERTIFIED
    assert int(cf.clipping(logits, [0], 2, sound=True).certified) == cf.VULNERABLE
    for sound in (False, True):
        _assert_same("clipping", maps, np.array([0]), (2, 2), cf.clipping(logits, [0], 2, sound=sound),
                     dict(clip=None, sound=sound))


# --- exact ties and the float32 screening -----------------------------------------------------


def test_ties_follow_each_functions_rule():
    """Two identical classes: masking and detection's global prediction take the higher index
    (stable argsort), clipping and detection's masked prediction the lower (argmax)."""
    maps = np.zeros((1, 4, 4, 3), np.float32)
    maps[0, ..., 0] = maps[0, ..., 2] = 1.0
    logits = torch.from_numpy(maps)
    assert int(cf.masking(logits, None, 2).prediction) == 2
    assert int(cf.clipping(logits, None, 2, clip=5.0).prediction) == 0
    assert int(cf.undefended_prediction(logits)) == 0
    # Detection: the global prediction is class 2; every window's masked prediction is class 0
    # (equal scores) with confidence 1/2 -> an alert when tau < 1/2, not when tau = 1/2.
    assert int(cf.detection(logits, None, 2, 0.4).prediction) == cf.ALERT
    assert int(cf.detection(logits, None, 2, 0.5).prediction) == 2
    # Certification for label 2 fails at every window (masked prediction 0); confidence 1/2 is
    # not below tau = 1/2, so for label 0 only the global prediction (2) makes it code 0.
    assert int(cf.detection(logits, [2], 2, 0.5).certified) == cf.VULNERABLE
    assert int(cf.detection(logits, [0], 2, 0.5).certified) == cf.CLEAN_WRONG


def test_evidence_inside_one_window_sums_to_exactly_zero_outside():
    """All of the true class's evidence inside one window: masking it leaves exactly 0, which
    ties with an empty class, and the tie rule decides, not the rounding of total - window
    (0.1, 0.3, 0.7 and 0.9 are not dyadic: their sums round)."""
    maps = np.full((2, 5, 5, 3), -1.0, np.float32)
    maps[:, 1:3, 1:3, 1] = np.float32([[0.1, 0.7], [0.3, 0.9]])
    logits = torch.from_numpy(maps)
    # Label 1, rival classes 0 and 2 are empty (0 everywhere after clipping). With the window
    # over the evidence, class 1's bound is 0 = class 2's evidence, and 2 > 1 wins the tie.
    result = cf.masking(logits, [1, 1], 2)
    assert result.certified.tolist() == [cf.VULNERABLE] * 2
    _assert_same("masking", maps, np.array([1, 1]), (2, 2), result, dict(clip=None, threshold=0.0))
    maps[..., 2] = -5.0
    maps[..., 0] = -5.0
    swapped = maps[..., [0, 2, 1]]  # the evidence in the highest class: ties go its way
    result = cf.masking(torch.from_numpy(np.ascontiguousarray(swapped)), [2, 2], 2)
    assert result.certified.tolist() == [cf.CERTIFIED] * 2


def test_all_negative_maps():
    """Nothing survives clipping: every class has 0 evidence, the highest index wins."""
    maps = -np.random.default_rng(0).random((3, 6, 6, 4)).astype(np.float32) - 0.1
    logits = torch.from_numpy(maps)
    result = cf.masking(logits, [3, 0, 2], 3)
    assert result.prediction.tolist() == [3, 3, 3]
    assert result.certified.tolist() == [cf.CERTIFIED, cf.CLEAN_WRONG, cf.CLEAN_WRONG]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_totals_closer_than_float32_can_tell(dtype):
    """Classes whose totals differ far below float32 resolution: the screening pass cannot rank
    them, the float64 evaluation must (the oracle decides in float64)."""
    rng = np.random.default_rng(5)
    base = (rng.random((8, 6, 6, 1)) * 3 + 0.5).astype(np.float64)
    maps = np.repeat(base, 6, axis=3)
    tiny = 1e-12 if dtype == torch.float64 else 2.0**-20  # one float32 ulp of values near 4-8
    for n in range(8):
        maps[n, n % 6, (n + 1) % 6, n % 6] += tiny  # one class a hair ahead in one cell
    maps = maps.astype(np.float64 if dtype == torch.float64 else np.float32)
    labels = np.arange(8) % 6
    logits = torch.from_numpy(maps)
    for clip, threshold in ((None, 0.0), (None, 0.1), (3.0, 0.0)):
        result = cf.masking(logits, labels, 2, clip=clip, threshold=threshold)
        _assert_same("masking", maps, labels, (2, 2), result, dict(clip=clip, threshold=threshold))
    for clip in (None, 3.0):
        result = cf.clipping(logits * 30 if clip is None else logits, labels, 2, clip=clip)
        _assert_same("clipping", maps * 30 if clip is None else maps, labels, (2, 2), result, dict(clip=clip, sound=False))


def test_screening_bounds_hold_for_extreme_values():
    """Huge, tiny and mixed magnitudes in float16/bfloat16/float32/float64: identical results."""
    rng = np.random.default_rng(11)
    maps = rng.standard_normal((6, 7, 7, 6)) * 10.0 ** rng.integers(-6, 4, (6, 7, 7, 6))
    labels = rng.integers(0, 6, 6)
    maps[np.arange(6), :, :, labels] = np.abs(maps[np.arange(6), :, :, labels]) * 3
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        logits = torch.from_numpy(maps).to(dtype)
        exact = logits.double().numpy()
        for name, options in (("masking", dict(clip=None, threshold=0.0)), ("masking", dict(clip=50.0, threshold=0.3)),
                              ("clipping", dict(clip=None, sound=True)), ("clipping", dict(clip=100.0, sound=False)),
                              ("detection", dict(tau=0.5))):
            result = DEFENCES[name](logits, labels, 3, **options)
            _assert_same(name, exact, labels, (3, 3), result, options)


def test_chunking_does_not_change_results():
    maps, labels = random_maps(np.random.default_rng(2), 10, 6, 5, 4, "quarters", (2, 3))
    logits = torch.from_numpy(maps)
    for name, options in (("masking", dict(threshold=0.1)), ("clipping", dict(sound=True)), ("detection", dict(tau=0.3))):
        whole = DEFENCES[name](logits, labels, (2, 3), **options)
        for size in (1, 3, 7):
            part = DEFENCES[name](logits, labels, (2, 3), chunk_size=size, **options)
            assert torch.equal(part.prediction, whole.prediction) and torch.equal(part.certified, whole.certified)


# --- API -------------------------------------------------------------------------------------


def test_window_size():
    # PatchGuard's settings (USERS.md 1.1): BagNet-17 with 32 / 23 / 39 px, BagNet-33 with 32 px,
    # CIFAR at 192 px with 30 px.
    assert cf.window_size(32, 17) == 6 and cf.window_size(32, 33) == 8
    assert cf.window_size(23, 17) == 5 and cf.window_size(39, 17) == 7 and cf.window_size(30, 17) == 6
    assert cf.window_size(8, 9, stride=8) == 2 and cf.window_size(1, 1) == 1
    assert cf.window_size((32, 48), 17) == (6, 8)
    for q in (9, 17, 33):
        for p in range(1, 80):
            assert cf.window_size(p, q) == math.ceil((p + q - 1) / 8)
    with pytest.raises(ValueError, match="positive"):
        cf.window_size(0, 17)
    with pytest.raises(TypeError, match="int"):
        cf.window_size(32.0, 17)
    with pytest.raises(ValueError, match="rows, cols"):
        cf.window_size((1, 2, 3), 17)


def test_result_fields_and_summary():
    maps, labels = random_maps(np.random.default_rng(4), 12, 5, 5, 3, "quarters", (2, 2))
    result = cf.masking(torch.from_numpy(maps), torch.from_numpy(labels), (2, 2))
    assert result.prediction.shape == (12,) and result.prediction.dtype == torch.long
    assert result.certified.shape == (12,) and result.window == (2, 2) and result.defense == "masking"
    summary = result.summary()
    codes = result.certified.numpy()
    assert summary["images"] == 12 and sum(summary["codes"].values()) == 12
    assert summary["certified_accuracy"] == pytest.approx(np.mean(codes == 2))
    assert summary["defended_clean_accuracy"] == pytest.approx(np.mean(result.prediction.numpy() == labels))
    unlabelled = cf.masking(torch.from_numpy(maps), None, 2)
    assert unlabelled.certified is None and torch.equal(unlabelled.prediction, result.prediction)
    with pytest.raises(ValueError, match="labels"):
        unlabelled.summary()
    empty = cf.detection(torch.zeros(0, 4, 4, 3), [], 2, 0.5)
    assert empty.prediction.shape == (0,) and empty.certified.shape == (0,)
    assert empty.summary()["certified_accuracy"] == 0.0
    assert cf.clipping(torch.from_numpy(maps), labels, 2, clip=1.0).defense == "clip"
    assert cf.detection(torch.from_numpy(maps), labels, 2, 0.5).summary()["alert_rate"] >= 0


def test_bad_input():
    logits = torch.zeros(2, 5, 4, 3)
    with pytest.raises(ValueError, match=r"window \(6, 6\) is larger than the \(5, 4\) evidence map"):
        cf.masking(logits, [0, 1], 6)
    with pytest.raises(ValueError, match="larger than"):
        cf.detection(logits, [0, 1], (2, 5), 0.5)
    with pytest.raises(ValueError, match=r"\(N, H', W', C\)"):
        cf.clipping(torch.zeros(5, 4, 3), [0], 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        cf.masking(torch.zeros(2, 5, 4, 1), [0, 0], 2)
    with pytest.raises(TypeError, match="floating point"):
        cf.masking(torch.zeros(2, 5, 4, 3, dtype=torch.long), [0, 1], 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cf.masking(np.zeros((2, 5, 4, 3), np.float32), [0, 1], 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[3\]"):
        cf.masking(logits, [0, 3], 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[-1\]"):
        cf.clipping(logits, [-1, 0], 2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cf.detection(logits, [0, 1, 2], 2, 0.5)
    with pytest.raises(TypeError, match="integer"):
        cf.masking(logits, torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="labels are on meta"):
        cf.masking(logits, torch.zeros(2, dtype=torch.long, device="meta"), 2)
    with pytest.raises(TypeError, match="window"):
        cf.masking(logits, [0, 1], 2.5)
    with pytest.raises(ValueError, match="window"):
        cf.masking(logits, [0, 1], (0, 2))
    with pytest.raises(ValueError, match=r"threshold T must be in \[0, 1\)"):
        cf.masking(logits, [0, 1], 2, threshold=1.0)
    with pytest.raises(ValueError, match="clip"):
        cf.masking(logits, [0, 1], 2, clip=-1)
    with pytest.raises(ValueError, match="clip"):
        cf.clipping(logits, [0, 1], 2, clip=float("inf"))
    with pytest.raises(ValueError, match="tau"):
        cf.detection(logits, [0, 1], 2, 1.5)
    bad = logits.clone()
    bad[1, 2, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1 contain NaN"):
        cf.masking(bad, [0, 1], 2)
    bad[1, 2, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="unclipped"):
        cf.masking(bad, [0, 1], 2)
    assert cf.masking(bad, [0, 1], 2, clip=1.0).certified.shape == (2,)  # clipped: fine
    with pytest.raises(ValueError, match="NaN or infinite"):
        cf.detection(bad, [0, 1], 2, 0.5)


@CUDA
def test_cuda_matches_cpu():
    for maps, labels, window, _ in random_cases(seed=9, groups=10):
        cpu, gpu = torch.from_numpy(maps), torch.from_numpy(maps).cuda()
        for name, options in (("masking", dict(threshold=0.2)), ("clipping", dict(sound=True)),
                              ("clipping", dict(clip=1.0)), ("detection", dict(tau=0.5))):
            a = DEFENCES[name](cpu, labels, window, **options)
            b = DEFENCES[name](gpu, torch.from_numpy(labels).cuda(), window, **options)
            assert torch.equal(a.prediction, b.prediction.cpu()) and torch.equal(a.certified, b.certified.cpu())


# --- training-time aggregation -----------------------------------------------------------------


def _adv_reference(logits, labels, window):
    """PatchGuard's aggregation='adv', written out: clip at 0, true-class window sums by unfold,
    subtract the largest from the true class's total, divide by H' W'."""
    wy, wx = window
    x = torch.clamp(logits, 0, float("inf"))
    batch, height, width, _ = x.shape
    true = x[torch.arange(batch), :, :, labels]
    windows = true.unfold(1, wy, 1).unfold(2, wx, 1).reshape(batch, -1, wy, wx).sum(dim=(-2, -1))
    largest = windows.max(dim=-1).values
    out = x.sum(dim=(1, 2))
    out = out.index_put((torch.arange(batch), labels), out[torch.arange(batch), labels] - largest)
    return out / (height * width)


@pytest.mark.parametrize("window", [6, (3, 5)])
def test_masked_feature_logits_matches_reference_and_its_gradients(window):
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 9, 10, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 9])
    ours = cf.masked_feature_logits(logits, labels, window)
    expected = _adv_reference(logits, labels, window if isinstance(window, tuple) else (window, window))
    assert ours.shape == (3, 10)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(3, 10, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    # The true class's largest window gets no gradient from its own logit; other classes do.
    assert grad.abs().sum() > 0
    small = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    small_window = (2, 2) if isinstance(window, int) else (2, 3)
    assert torch.autograd.gradcheck(lambda x: cf.masked_feature_logits(x, torch.tensor([0, 2]), small_window), (small,))


def test_masked_feature_logits_keeps_dtype_and_checks_input():
    logits = torch.randn(2, 6, 6, 5, dtype=torch.bfloat16)
    assert cf.masked_feature_logits(logits, torch.tensor([1, 2])).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="larger than"):
        cf.masked_feature_logits(logits, torch.tensor([1, 2]), 7)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        cf.masked_feature_logits(logits, [1, 2])
