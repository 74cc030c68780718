"""mlml.metrics against scikit-learn (and a brute-force search for the calibrated thresholds)."""

from __future__ import annotations

import doctest
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn import metrics as skm

from mlml import metrics

TOL = 1e-6
DTYPES = [torch.float32, torch.float64]
TIES = ["continuous", "decimal", "integer"]  # how many tied scores the random inputs have
SMALL = settings(max_examples=50, deadline=None)


def make_inputs(
    n: int, c: int, ties: str, dtype: torch.dtype, seed: int, p_pos: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scores (N, C) in [0, 1] with the requested ties, and bool targets (N, C)."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n, c))
    if ties == "decimal":
        scores = scores.round(1)
    elif ties == "integer":
        scores = rng.integers(0, 4, (n, c)) / 3
    targets = rng.random((n, c)) < p_pos
    return torch.tensor(scores, dtype=dtype), torch.from_numpy(targets)


# --- scikit-learn references, one binary problem per column --------------------------------------


def sk_average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array([
        skm.average_precision_score(t, s) if t.any() else np.nan
        for s, t in zip(scores.T, targets.T)
    ])


def sk_auroc(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array([
        skm.roc_auc_score(t, s) if 0 < t.sum() < len(t) else np.nan
        for s, t in zip(scores.T, targets.T)
    ])


def sk_f1(pred: np.ndarray, targets: np.ndarray, average: str | None) -> np.ndarray:
    if average == "micro":
        return np.array(skm.f1_score(targets.ravel(), pred.ravel(), zero_division=0))
    per_class = np.array([skm.f1_score(t, p, zero_division=0) for p, t in zip(pred.T, targets.T)])
    return per_class.mean() if average == "macro" else per_class


def nanmean_or_nan(x: np.ndarray) -> float:
    return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else np.nan


def assert_close(actual: torch.Tensor, expected: np.ndarray | float) -> None:
    np.testing.assert_allclose(actual.double().cpu().numpy(), expected, rtol=0, atol=TOL)


def assert_matches_sklearn(scores: torch.Tensor, targets: torch.Tensor) -> None:
    """Every metric of (scores, targets) equals its scikit-learn counterpart."""
    s, t = scores.numpy(), targets.numpy().astype(bool)

    ap, expected_ap = metrics.average_precision(scores, targets), sk_average_precision(s, t)
    assert ap.dtype == scores.dtype and ap.shape == (s.shape[1],)
    assert_close(ap, expected_ap)
    assert_close(metrics.mean_average_precision(scores, targets, None), expected_ap)
    assert_close(metrics.mean_average_precision(scores, targets), nanmean_or_nan(expected_ap))
    micro = skm.average_precision_score(t.ravel(), s.ravel()) if t.any() else np.nan
    assert_close(metrics.mean_average_precision(scores, targets, "micro"), micro)

    expected_auroc = sk_auroc(s, t)
    assert_close(metrics.auroc(scores, targets, None), expected_auroc)
    assert_close(metrics.auroc(scores, targets), nanmean_or_nan(expected_auroc))

    first_row = torch.from_numpy(s[0]).to(scores.dtype)  # thresholds at some scores: ties at >=
    for threshold in (0.5, first_row):
        pred = s >= (threshold.numpy() if isinstance(threshold, torch.Tensor) else threshold)
        per_class = sk_f1(pred, t, None)
        assert_close(metrics.f1_score(scores, targets, threshold, None), per_class)
        assert_close(metrics.f1_score(scores, targets, threshold, "macro"), per_class.mean())
        assert_close(metrics.f1_score(scores, targets, threshold, "micro"), sk_f1(pred, t, "micro"))
        assert_close(metrics.hamming_loss(scores, targets, threshold), skm.hamming_loss(t, pred))


# --- agreement with scikit-learn ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("seed", range(3))
def test_random_inputs_match_sklearn(dtype: torch.dtype, ties: str, seed: int) -> None:
    assert_matches_sklearn(*make_inputs(40, 5, ties, dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_heavily_tied_input_matches_sklearn(dtype: torch.dtype) -> None:
    assert_matches_sklearn(*make_inputs(3000, 4, "integer", dtype, seed=7, p_pos=0.1))


@pytest.mark.parametrize("chunk_bytes", [1, 40 * 24 * 3])   # one class per chunk; three
def test_chunked_ranking_metrics_equal_unchunked(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    scores, targets = make_inputs(40, 7, "decimal", torch.float64, seed=3, p_pos=0.2)
    targets[:, 2] = False                                        # a class without positives (NaN) in a chunk
    scores[:5, 4] = -torch.inf                                   # positives and negatives at -inf
    targets[:3, 4] = True
    whole = {f: getattr(metrics, f)(scores, targets) for f in ("average_precision", "calibrate_thresholds")}
    whole["auroc"] = metrics.auroc(scores, targets, average=None)
    monkeypatch.setattr(metrics, "CHUNK_BYTES", chunk_bytes)
    assert metrics._classes_per_chunk(40, 24) < 7
    for name, ref in whole.items():
        got = metrics.auroc(scores, targets, average=None) if name == "auroc" else getattr(metrics, name)(scores, targets)
        assert torch.equal(got.isnan(), ref.isnan()) and torch.allclose(got.nan_to_num(), ref.nan_to_num(), atol=TOL), name
    assert_matches_sklearn(scores.nan_to_num(neginf=-1e300), targets)          # scikit-learn takes no infinity


@st.composite
def score_target_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Small inputs from a handful of values, so that ties and degenerate columns are common."""
    n, c = draw(st.integers(1, 10)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    values = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1, width=32)
    scores = draw(hnp.arrays(dtype, (n, c), elements=values))
    targets = draw(hnp.arrays(np.bool_, (n, c)))
    return torch.from_numpy(scores), torch.from_numpy(targets)


@SMALL
@given(score_target_pairs())
def test_hypothesis_inputs_match_sklearn(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert_matches_sklearn(*pair)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sklearn_multilabel_averages(dtype: torch.dtype) -> None:
    """The per-column references above agree with scikit-learn's own multilabel averaging."""
    scores, targets = make_inputs(50, 4, "decimal", dtype, seed=3, p_pos=0.4)
    s, t = scores.numpy(), targets.numpy()
    assert t.any(axis=0).all() and not t.all(axis=0).any()
    assert_close(metrics.mean_average_precision(scores, targets), skm.average_precision_score(t, s))
    assert_close(
        metrics.mean_average_precision(scores, targets, "micro"),
        skm.average_precision_score(t, s, average="micro"),
    )
    assert_close(metrics.auroc(scores, targets), skm.roc_auc_score(t, s))
    for average in ("macro", "micro"):
        expected = skm.f1_score(t, s >= 0.5, average=average, zero_division=0)
        assert_close(metrics.f1_score(scores, targets, 0.5, average), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_macro_map_excludes_classes_without_positives(dtype: torch.dtype) -> None:
    scores, targets = make_inputs(30, 5, "decimal", dtype, seed=1, p_pos=0.5)
    targets[:, [1, 3]] = False
    s, t = scores.numpy(), targets.numpy()
    assert metrics.classes_without_positives(targets) == [1, 3]
    per_class = metrics.mean_average_precision(scores, targets, None)
    assert per_class[[1, 3]].isnan().all() and not per_class[[0, 2, 4]].isnan().any()
    kept = [0, 2, 4]
    expected = skm.average_precision_score(t[:, kept], s[:, kept], average="macro")
    assert_close(metrics.mean_average_precision(scores, targets), expected)


def test_map_is_nan_without_any_positive() -> None:
    scores, targets = torch.rand(6, 3), torch.zeros(6, 3, dtype=torch.bool)
    assert metrics.mean_average_precision(scores, targets).isnan()
    assert metrics.mean_average_precision(scores, targets, "micro").isnan()
    assert metrics.classes_without_positives(targets) == [0, 1, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_auroc_excludes_single_valued_classes(dtype: torch.dtype) -> None:
    scores, targets = make_inputs(30, 4, "integer", dtype, seed=2, p_pos=0.5)
    targets[:, 0] = True  # all positive
    targets[:, 2] = False  # all negative
    s, t = scores.numpy(), targets.numpy()
    per_class = metrics.auroc(scores, targets, None)
    assert per_class[[0, 2]].isnan().all()
    expected = skm.roc_auc_score(t[:, [1, 3]], s[:, [1, 3]], average="macro")
    assert_close(metrics.auroc(scores, targets), expected)


def test_targets_may_be_bool_int_or_float() -> None:
    scores, targets = make_inputs(20, 3, "decimal", torch.float64, seed=4)
    for fn in (metrics.average_precision, metrics.calibrate_thresholds):
        results = [fn(scores, targets.to(d)) for d in (torch.bool, torch.long, torch.float32)]
        assert all(torch.equal(results[0], r) for r in results[1:])


def test_ranking_metrics_are_invariant_to_monotone_transforms() -> None:
    logits = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.rand(50, 4, generator=torch.Generator().manual_seed(1)) < 0.3
    for fn in (metrics.average_precision, lambda s, t: metrics.auroc(s, t, None)):
        assert_close(fn(logits, targets), fn(torch.sigmoid(logits), targets).numpy())


def test_docstring_examples() -> None:
    result = doctest.testmod(metrics, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# --- calibrated thresholds -----------------------------------------------------------------------


def f1_np(pred: np.ndarray, target: np.ndarray) -> float:
    tp, wrong = (pred & target).sum(), (pred ^ target).sum()
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def check_calibration(scores: torch.Tensor, targets: torch.Tensor) -> None:
    """Each class's threshold reaches the brute-force best F1 and sits in a gap between scores."""
    thresholds = metrics.calibrate_thresholds(scores, targets)
    assert thresholds.dtype == scores.dtype and thresholds.shape == (scores.shape[1],)
    for s, t, thr in zip(scores.numpy().T, targets.numpy().T.astype(bool), thresholds.numpy()):
        if not t.any():
            assert thr == np.inf
            continue
        candidates = np.append(np.unique(s), np.inf)
        best = max(f1_np(s >= c, t) for c in candidates)
        assert abs(f1_np(s >= thr, t) - best) < 1e-12
        if (s < thr).any():  # not predicting everything: strictly between two distinct scores
            chosen, lower = s[s >= thr].min(), s[s < thr].max()
            assert lower < thr <= chosen
            assert thr < chosen or np.nextafter(lower, chosen) == chosen
        else:
            assert thr == s.min()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", TIES)
def test_calibrated_thresholds_reach_best_f1(dtype: torch.dtype, ties: str) -> None:
    scores, targets = make_inputs(60, 6, ties, dtype, seed=5)
    targets[:, 4] = False
    targets[:, 5] = True
    check_calibration(scores, targets)
    thresholds = metrics.calibrate_thresholds(scores, targets)
    assert thresholds[4] == torch.inf
    assert thresholds[5] == scores[:, 5].min()


@SMALL
@given(score_target_pairs())
def test_hypothesis_calibrated_thresholds_reach_best_f1(
    pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    check_calibration(*pair)


def test_calibration_prefers_the_highest_of_equally_good_thresholds() -> None:
    scores = torch.tensor([[0.9], [0.7], [0.5], [0.3]])
    targets = torch.tensor([[1], [0], [0], [1]])  # F1 = 2/3 at 0.9 and at 0.3
    assert_close(metrics.calibrate_thresholds(scores, targets), np.float32([0.8]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_calibration_between_adjacent_and_extreme_floats(dtype: torch.dtype) -> None:
    """The midpoint of two adjacent floats rounds onto one of them; the threshold must not."""
    big = torch.finfo(dtype).max

    def next_float(x: float, toward: float) -> float:
        x, toward = torch.tensor(x, dtype=dtype), torch.tensor(toward, dtype=dtype)
        return torch.nextafter(x, toward).item()

    # Columns: 1 over 1 - ulp and 0.75 + ulp over 0.75, whose midpoints round (to even) up and
    # down respectively; max over max / 2, whose sum overflows; max over -max.
    top = [1.0, next_float(0.75, 1.0), big, big]
    bottom = [next_float(1.0, 0.0), 0.75, big / 2, -big]
    scores = torch.tensor([top, bottom], dtype=dtype)
    targets = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    thresholds = metrics.calibrate_thresholds(scores, targets)
    assert thresholds.isfinite().all()
    assert torch.equal(scores >= thresholds, targets.bool())


# --- summary --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_multilabel_metrics_summary(dtype: torch.dtype) -> None:
    scores, targets = make_inputs(40, 5, "decimal", dtype, seed=6)
    s, t = scores.numpy(), targets.numpy()
    summary = metrics.multilabel_metrics(scores, targets, threshold=0.5)
    keys = ["mAP_macro", "mAP_micro", "auroc_macro", "f1_macro", "f1_micro", "hamming"]
    assert list(summary) == keys
    assert all(isinstance(v, float) for v in summary.values())
    assert abs(summary["mAP_macro"] - nanmean_or_nan(sk_average_precision(s, t))) < TOL
    assert abs(summary["f1_micro"] - sk_f1(s >= 0.5, t, "micro")) < TOL
    assert abs(summary["hamming"] - skm.hamming_loss(t, s >= 0.5)) < TOL

    thresholds = metrics.calibrate_thresholds(scores, targets)
    calibrated = metrics.multilabel_metrics(scores, targets, thresholds=thresholds)
    pred = s >= thresholds.numpy()
    assert abs(calibrated["f1_macro_calibrated"] - sk_f1(pred, t, "macro")) < TOL
    assert abs(calibrated["f1_micro_calibrated"] - sk_f1(pred, t, "micro")) < TOL
    assert abs(calibrated["hamming_calibrated"] - skm.hamming_loss(t, pred)) < TOL
    assert calibrated["f1_macro_calibrated"] >= summary["f1_macro"]


def test_multilabel_metrics_rejects_logits() -> None:
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        metrics.multilabel_metrics(torch.randn(8, 3) * 5, torch.ones(8, 3))


# --- devices --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    scores, targets = make_inputs(500, 6, "decimal", dtype, seed=8)
    targets[:, 0] = False
    for fn in (
        metrics.average_precision,
        lambda s, t: metrics.mean_average_precision(s, t, "micro"),
        lambda s, t: metrics.auroc(s, t, None),
        lambda s, t: metrics.f1_score(s, t, 0.3, None),
        metrics.hamming_loss,
        metrics.calibrate_thresholds,
    ):
        on_gpu = fn(scores.cuda(), targets.cuda())
        assert on_gpu.is_cuda
        assert_close(on_gpu, fn(scores, targets).numpy())
    cpu_summary = metrics.multilabel_metrics(scores, targets)
    gpu_summary = metrics.multilabel_metrics(scores.cuda(), targets.cuda())
    assert gpu_summary == pytest.approx(cpu_summary, abs=TOL, nan_ok=True)


# --- input validation -----------------------------------------------------------------------------

ALL_FUNCTIONS = {
    "average_precision": metrics.average_precision,
    "map_macro": metrics.mean_average_precision,
    "map_micro": lambda s, t: metrics.mean_average_precision(s, t, "micro"),
    "auroc": metrics.auroc,
    "f1_score": metrics.f1_score,
    "hamming_loss": metrics.hamming_loss,
    "calibrate_thresholds": metrics.calibrate_thresholds,
    "multilabel_metrics": metrics.multilabel_metrics,
}

BAD_INPUTS = {
    "1-D": (torch.rand(5), torch.ones(5), "2-D"),
    "shape mismatch": (torch.rand(4, 3), torch.ones(4, 2), "differs from scores shape"),
    "transposed": (torch.rand(4, 3), torch.ones(3, 4), "differs from scores shape"),
    "empty": (torch.rand(0, 3), torch.ones(0, 3), "empty"),
    "integer scores": (torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3), "floating-point"),
    "NaN scores": (torch.full((4, 3), torch.nan), torch.ones(4, 3), "NaN"),
    "non-binary targets": (torch.rand(4, 3), torch.full((4, 3), 2), "only 0 and 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("name", ALL_FUNCTIONS)
def test_invalid_inputs_raise(name: str, case: str) -> None:
    scores, targets, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        ALL_FUNCTIONS[name](scores, targets)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t: metrics.mean_average_precision(s, t, "weighted"), "unknown average"),
        (lambda s, t: metrics.auroc(s, t, "micro"), "unknown average 'micro'"),
        (lambda s, t: metrics.f1_score(s, t, 0.5, "samples"), "unknown average 'samples'"),
        (lambda s, t: metrics.f1_score(s, t, torch.full((2,), 0.5)), r"shape \(3,\) = \(C,\)"),
        (lambda s, t: metrics.hamming_loss(s, t, torch.full((4, 3), 0.5)), r"\(3,\) = \(C,\)"),
        (lambda s, t: metrics.f1_score(s, t, float("nan")), "threshold is NaN"),
        (lambda s, t: metrics.f1_score(s, t, torch.tensor([0.5, torch.nan, 0.5])), "NaN"),
        (lambda s, t: metrics.classes_without_positives(t[0]), "2-D"),
    ],
)
def test_invalid_options_raise(call: Callable[..., object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.rand(4, 3), torch.ones(4, 3))


def test_non_tensor_inputs_raise() -> None:
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        metrics.average_precision(np.zeros((3, 2)), torch.ones(3, 2))


# ---------------------------------------------------------------- exclusive groups with an unknown class

def _group_case(seed: int, n: int = 300, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, k + 1, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.6, true, torch.randint(0, k + 1, (n,), generator=g))
    score = (torch.rand(n, generator=g) + 0.5 * (true == k)).round(decimals=1)   # ties on purpose
    return pred, true, score, k


@pytest.mark.parametrize("seed", range(4))
def test_group_metrics_against_naive_loops(seed):
    from sklearn.metrics import roc_auc_score

    from mlml.metrics import decoded_accuracy, group_accuracy, unknown_accuracy, unknown_auroc

    pred, true, score, k = _group_case(seed)
    class_scores = torch.rand(len(true), k, generator=torch.Generator().manual_seed(seed))
    applicable = [i for i in range(len(true)) if true[i] < k]
    none = [i for i in range(len(true)) if true[i] == k]
    top = [max(range(k), key=lambda c: class_scores[i, c]) for i in range(len(true))]
    assert group_accuracy(class_scores, true).item() == pytest.approx(sum(int(top[i] == true[i]) for i in applicable) / len(applicable))
    assert decoded_accuracy(pred, true, k).item() == pytest.approx(sum(int(pred[i] == true[i]) for i in range(len(true))) / len(true))
    assert unknown_accuracy(pred, true, k).item() == pytest.approx(sum(int(pred[i] == k) for i in none) / len(none))
    assert unknown_auroc(score, true, k).item() == pytest.approx(roc_auc_score((true == k).numpy(), score.numpy()), abs=1e-6)


def test_group_metrics_undefined_and_checked():
    import math

    from mlml.metrics import group_accuracy, unknown_accuracy, unknown_auroc

    all_none = torch.tensor([2, 2])
    assert math.isnan(group_accuracy(torch.rand(2, 2), all_none)) and math.isnan(unknown_auroc(torch.tensor([0.1, 0.2]), all_none, 2))
    assert math.isnan(unknown_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), 2))
    with pytest.raises(ValueError, match="0..2"):
        unknown_accuracy(torch.tensor([3]), torch.tensor([0]), 2)


def test_evaluation_group_metrics_against_naive():
    from mlml.evaluation import group_metrics
    from mlml.labels import Group, LabelSpace

    space = LabelSpace(("circle", "bar", "stripes", "dots"), (Group("object", (0, 1), True), Group("pattern", (2, 3), True, True, (0,))))
    targets = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0]])
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.3], [0.6, 0.4, 0.7, 0.2], [0.2, 0.8, 0.1, 0.1], [0.3, 0.7, 0.5, 0.2]])
    got = group_metrics(scores, targets, space, {"object": False, "pattern": True})
    # pattern: unknown = 1 - sum -> [0.1, 0.1, 0.8, 0.3]; pred = [stripes, stripes, unknown, stripes]
    assert got == pytest.approx({"group_acc/object": 1.0, "decoded_acc/object": 1.0, "group_acc/pattern": 0.5,
                                 "decoded_acc/pattern": 0.5, "unknown_acc/pattern": 0.5, "unknown_auroc/pattern": 1.0})


# --- partially annotated data: metrics on each class's annotated entries ----------------------------


def assert_masked_matches_sklearn(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
    """Every masked metric equals scikit-learn on the annotated entries of each class."""
    s, t, m = scores.numpy(), targets.numpy().astype(bool), mask.numpy()
    cols = [(s[m[:, c], c], t[m[:, c], c]) for c in range(s.shape[1])]      # each class's annotated entries
    ap = np.array([skm.average_precision_score(tc, sc) if tc.any() else np.nan for sc, tc in cols])
    assert_close(metrics.average_precision(scores, targets, mask), ap)
    assert_close(metrics.mean_average_precision(scores, targets, "macro", mask), nanmean_or_nan(ap))
    micro = skm.average_precision_score(t[m], s[m]) if t[m].any() else np.nan
    assert_close(metrics.mean_average_precision(scores, targets, "micro", mask), micro)
    auc = np.array([skm.roc_auc_score(tc, sc) if 0 < tc.sum() < len(tc) else np.nan for sc, tc in cols])
    assert_close(metrics.auroc(scores, targets, None, mask), auc)
    for threshold in (0.5, torch.from_numpy(s[0]).to(scores.dtype)):
        thr = threshold.numpy() if isinstance(threshold, torch.Tensor) else np.full(s.shape[1], threshold)
        f1 = np.array([skm.f1_score(tc, sc >= thr[c], zero_division=0) if len(tc) else 0.0 for c, (sc, tc) in enumerate(cols)])
        assert_close(metrics.f1_score(scores, targets, threshold, None, mask), f1)
        assert_close(metrics.f1_score(scores, targets, threshold, "macro", mask), f1.mean())
        pred = s >= thr
        if m.any():
            assert_close(metrics.f1_score(scores, targets, threshold, "micro", mask), skm.f1_score(t[m], pred[m], zero_division=0))
            assert_close(metrics.hamming_loss(scores, targets, threshold, mask), skm.hamming_loss(t[m], pred[m]))
    # Calibrated thresholds reach the best F1 of the annotated entries.
    for c, ((sc, tc), thr) in enumerate(zip(cols, metrics.calibrate_thresholds(scores, targets, mask).numpy())):
        if not tc.any():
            assert thr == np.inf
            continue
        best = max(f1_np(sc >= x, tc) for x in np.append(np.unique(sc), np.inf))
        assert abs(f1_np(sc >= thr, tc) - best) < 1e-12


@st.composite
def masked_triples(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, targets = draw(score_target_pairs())
    mask = draw(hnp.arrays(np.bool_, tuple(scores.shape)))
    return scores, targets, torch.from_numpy(mask)


@SMALL
@given(masked_triples())
def test_hypothesis_masked_metrics_match_sklearn_on_the_annotated_entries(triple) -> None:
    assert_masked_matches_sklearn(*triple)


@pytest.mark.parametrize("ties", TIES)
def test_masked_metrics_match_sklearn_and_a_full_mask_changes_nothing(ties: str) -> None:
    scores, targets = make_inputs(80, 5, ties, torch.float64, seed=11)
    mask = torch.from_numpy(np.random.default_rng(2).random((80, 5)) < 0.4)
    assert_masked_matches_sklearn(scores, targets, mask)
    full = torch.ones_like(mask)
    thresholds = metrics.calibrate_thresholds(scores, targets)
    assert metrics.multilabel_metrics(scores, targets, thresholds=thresholds, mask=full) == \
        metrics.multilabel_metrics(scores, targets, thresholds=thresholds)
    # Unannotated entries are ignored, whatever their target: scores of entries outside the mask do not matter.
    moved = torch.where(mask, scores, 1.0 - scores)
    assert metrics.multilabel_metrics(moved, targets, mask=mask) == pytest.approx(metrics.multilabel_metrics(scores, targets, mask=mask), abs=1e-12)
