"""Model health rules without I/O: the prediction shift between two versions (exact for class
counts, re-binned for values), the default gates, and accuracy in the A/B verdict."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.telemetry.drift import TensorDrift, psi
from fleet_server.rollouts.spec import DEFAULT_PREDICTION_SHIFT, RolloutCreate
from fleet_server.rollouts.verdict import arm, compare
from fleet_server.telemetry.query import Totals
from fleet_server.telemetry.shift import (
    MAX_SHIFT_CLASSES,
    MIN_SHIFT_VALUES,
    compare_outputs,
    rebin,
)
from tests.unit.test_rollout_rules import body, sketch_of

CLASSES = TensorDrift("top1", None, np.zeros(1, np.int64), np.zeros((1, 0)), np.ones((1, 4)))


def top1(counts: list[int]) -> np.ndarray:
    return np.asarray([counts], np.int64)


def test_a_one_class_model_is_far_from_its_predecessor_and_a_retrain_is_near() -> None:
    before = top1([211, 276, 195, 318])
    retrain = top1([210, 265, 202, 323])  # ~3 % of decisions moved
    collapsed = top1([1000, 0, 0, 0])
    [honest] = compare_outputs({"p": before}, {"p": retrain}, {"p": CLASSES})
    [broken] = compare_outputs({"p": before}, {"p": collapsed}, {"p": CLASSES})
    assert honest.psi is not None and honest.psi < 0.01 < DEFAULT_PREDICTION_SHIFT
    assert broken.psi is not None and broken.psi > 5 * DEFAULT_PREDICTION_SHIFT
    assert broken.candidate == [1.0, 0.0, 0.0, 0.0]
    assert broken.previous[0] == pytest.approx(0.211)


def test_too_few_predictions_are_not_judged() -> None:
    few = top1([MIN_SHIFT_VALUES - 1, 0, 0, 0])
    [shift] = compare_outputs({"p": top1([300, 300, 300, 300])}, {"p": few}, {"p": CLASSES})
    assert shift.psi is None and shift.values == MIN_SHIFT_VALUES - 1


def test_rebinning_into_the_previous_versions_bins() -> None:
    rng = np.random.default_rng(0)
    old = TensorDrift.build(rng.normal(size=(4000, 1, 1)), top1=False)
    new = TensorDrift.build(rng.normal(0.05, 1.05, size=(4000, 1, 1)), top1=False)
    assert rebin(old.count(np.zeros((1, 1))), old, old) is not None  # same bins: unchanged
    live = rng.normal(size=(20000, 1, 1))
    moved = rebin(new.count(live, stacked=True), new, old)
    assert moved is not None and moved.sum() == pytest.approx(20000)
    # The same traffic through either binning ends up in (nearly) the same place.
    [shift] = compare_outputs({"y": old.count(live, stacked=True)}, {"y": moved}, {"y": old})
    assert shift.psi is not None and shift.psi < 0.01
    stuck = rebin(new.count(np.full((20000, 1, 1), 3.0), stacked=True), new, old)
    [far] = compare_outputs({"y": old.count(live, stacked=True)}, {"y": stuck}, {"y": old})
    assert far.psi is not None and far.psi > 1
    # Different kinds or classes cannot be compared.
    assert rebin(top1([1, 2, 3, 4]), CLASSES, old) is None
    five = TensorDrift("top1", None, np.zeros(1, np.int64), np.zeros((1, 0)), np.ones((1, 5)))
    assert rebin(top1([1, 2, 3, 4]), CLASSES, five) is None


def test_rebinning_keeps_a_point_mass_on_repeated_edges() -> None:
    # ReLU-like outputs: most values exactly 0, so several edges are 0.
    rng = np.random.default_rng(1)
    values = np.maximum(rng.normal(size=(4000, 1, 1)), 0)
    ref = TensorDrift.build(values, top1=False)
    assert (ref.edges[0] == 0).sum() > 1
    counts = ref.count(values[:, 0])
    moved = rebin(counts, ref, ref)
    assert moved is not None and np.array_equal(moved, counts)


def test_the_prediction_gate_is_on_by_default_for_canary_ab_and_shadow() -> None:
    def gates(**extra: object) -> dict[str, object]:
        return RolloutCreate.model_validate(body(**extra)).plan()["gates"]

    assert gates(strategy="canary")["max_prediction_shift"] == DEFAULT_PREDICTION_SHIFT
    assert gates(strategy="ab", bake_s=60)["max_prediction_shift"] == DEFAULT_PREDICTION_SHIFT
    assert gates(strategy="shadow", shadow_of="main")["max_prediction_shift"] == (
        DEFAULT_PREDICTION_SHIFT
    )
    assert gates()["max_prediction_shift"] is None  # all at once: no predecessor to compare
    # Explicit gates keep the default unless they turn it off or set it.
    explicit = gates(strategy="canary", gates={"max_error_rate": 0.01})
    assert explicit["max_prediction_shift"] == DEFAULT_PREDICTION_SHIFT
    off = gates(strategy="canary", gates={"max_prediction_shift": None})
    assert off["max_prediction_shift"] is None
    assert gates(strategy="canary", gates={"max_prediction_shift": 0.1})[
        "max_prediction_shift"
    ] == pytest.approx(0.1)


def test_labels_drive_the_ab_verdict() -> None:
    same = sketch_of([1.0 + 0.1 * (i % 10) for i in range(400)])
    a = arm("1", Totals(400, 0, same, labelled=400, correct=300))
    b = arm("2", Totals(400, 0, same, labelled=400, correct=352))
    verdict = compare(a, b, 0.95)
    assert verdict["comparison"]["accuracy"]["better"] == "b"
    assert verdict["comparison"]["accuracy"]["confidence"] > 0.99
    assert verdict["winner"] == "b"
    worse = compare(a, arm("2", Totals(400, 0, same, labelled=400, correct=250)), 0.95)
    assert worse["winner"] == "a"
    # Without labels accuracy is not compared (and decides nothing).
    none = compare(arm("1", Totals(400, 0, same)), arm("2", Totals(400, 0, same)), 0.95)
    assert none["comparison"]["accuracy"] == {"better": None, "confidence": None}
    assert none["winner"] is None


def test_many_classes_are_compared_over_the_frequent_ones_and_other() -> None:
    """At 1,000 classes and a canary's 200 predictions, class-by-class PSI of two identical
    models is ~5 (pure sampling noise): the gate would stop every honest update. Folded into
    the 9 classes both versions answer most and "other", noise stays under the threshold,
    and a collapse (onto a frequent or a rare class) still shows."""
    rng = np.random.default_rng(7)
    k = 1000
    mix = rng.dirichlet(np.full(k, 0.3))
    many = TensorDrift("top1", None, np.zeros(1, np.int64), np.zeros((1, 0)), np.ones((1, k)))

    def sample(n: int, p: np.ndarray = mix) -> np.ndarray:
        return np.bincount(rng.choice(k, n, p=p), minlength=k)[None]

    scores = []
    for _ in range(200):
        before, after = sample(MIN_SHIFT_VALUES * 3), sample(MIN_SHIFT_VALUES)
        unfolded = psi(after, before / before.sum())[0]
        assert unfolded > 1  # what the gate would have judged
        [honest] = compare_outputs({"p": before}, {"p": after}, {"p": many})
        assert honest.psi is not None and len(honest.previous) == MAX_SHIFT_CLASSES
        scores.append(honest.psi)
    # Two identical models: noise well under the threshold, at most rarely near it.
    assert np.median(scores) < 0.1 and np.percentile(scores, 99) < DEFAULT_PREDICTION_SHIFT
    before = sample(600)
    assert honest.labels is not None and honest.labels[-1] == "other"
    [frequent] = compare_outputs(
        {"p": before}, {"p": sample(300, np.eye(k)[int(np.argmax(mix))])}, {"p": many}
    )
    rare = int(np.argmin(mix))
    [onto_rare] = compare_outputs({"p": before}, {"p": sample(300, np.eye(k)[rare])}, {"p": many})
    for collapsed in (frequent, onto_rare):
        assert collapsed.psi is not None and collapsed.psi > 4 * DEFAULT_PREDICTION_SHIFT
    assert frequent.labels is not None and frequent.labels[0] == str(int(np.argmax(mix)))
    # The class it collapsed onto is frequent among both versions' answers: a bin of its own.
    assert onto_rare.labels is not None and str(rare) in onto_rare.labels
    assert onto_rare.candidate[onto_rare.labels.index(str(rare))] == 1.0
