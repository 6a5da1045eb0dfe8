"""Tests for loraens.metrics: hand-computed values first, then independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loraens.metrics import (
    METRIC_NAMES,
    accuracy,
    brier,
    compute_metrics,
    ece,
    ensemble_probs,
    ensemble_probs_from_logits,
    evaluate_ensemble,
    nll,
)
from loraens.tables import format_comparison, format_table

# Four questions, three choices.
#   q0 [0.70, 0.20, 0.10] target 0 -> correct, confidence 0.7
#   q1 [0.60, 0.30, 0.10] target 1 -> wrong,   confidence 0.6
#   q2 [0.10, 0.80, 0.10] target 1 -> correct, confidence 0.8
#   q3 [0.25, 0.25, 0.50] target 2 -> correct, confidence 0.5
PROBS = [[0.70, 0.20, 0.10], [0.60, 0.30, 0.10], [0.10, 0.80, 0.10], [0.25, 0.25, 0.50]]
TARGETS = [0, 1, 1, 2]


def _random_case(seed: int = 0, n: int = 500, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.7), size=n)
    # Targets that agree with the argmax more often than chance, so ECE is not trivial.
    targets = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, c, size=n))
    return probs, targets


# --------------------------------------------------------------------------- hand-computed


def test_accuracy_by_hand() -> None:
    # q0, q2, q3 correct, q1 wrong: 3 / 4.
    assert accuracy(PROBS, TARGETS) == pytest.approx(0.75)


def test_nll_by_hand() -> None:
    # -(ln 0.7 + ln 0.3 + ln 0.8 + ln 0.5) / 4
    # = (0.356675 + 1.203973 + 0.223144 + 0.693147) / 4 = 2.476939 / 4 = 0.619235
    expected = -(math.log(0.7) + math.log(0.3) + math.log(0.8) + math.log(0.5)) / 4
    assert expected == pytest.approx(0.619235, abs=1e-6)
    assert nll(PROBS, TARGETS) == pytest.approx(expected)


def test_brier_by_hand() -> None:
    # q0: 0.3^2 + 0.2^2 + 0.1^2        = 0.09 + 0.04 + 0.01     = 0.14
    # q1: 0.6^2 + 0.7^2 + 0.1^2        = 0.36 + 0.49 + 0.01     = 0.86
    # q2: 0.1^2 + 0.2^2 + 0.1^2        = 0.01 + 0.04 + 0.01     = 0.06
    # q3: 0.25^2 + 0.25^2 + 0.5^2      = 0.0625 + 0.0625 + 0.25 = 0.375
    # mean = (0.14 + 0.86 + 0.06 + 0.375) / 4 = 1.435 / 4 = 0.35875
    assert brier(PROBS, TARGETS) == pytest.approx(0.35875)


def test_ece_by_hand_15_bins() -> None:
    # Width 1/15: 0.5 -> (7/15, 8/15], 0.6 -> (8/15, 9/15], 0.7 -> (10/15, 11/15],
    # 0.8 -> (11/15, 12/15]. One question per bin, so ECE = mean |correct - conf|:
    # (|1 - 0.7| + |0 - 0.6| + |1 - 0.8| + |1 - 0.5|) / 4 = (0.3 + 0.6 + 0.2 + 0.5) / 4 = 0.4
    assert ece(PROBS, TARGETS) == pytest.approx(0.4)


def test_ece_by_hand_2_bins() -> None:
    # Bins (0, 0.5] and (0.5, 1]; q3's confidence 0.5 sits on the edge and goes to the lower bin.
    # Bin 0: {q3}: acc 1, conf 0.5 -> 1/4 * 0.5 = 0.125
    # Bin 1: {q0, q1, q2}: acc 2/3, conf (0.7 + 0.6 + 0.8) / 3 = 0.7 -> 3/4 * 1/30 = 0.025
    # ECE = 0.15  (0.5 in the upper bin would give |0.75 - 0.65| = 0.1 instead)
    assert ece(PROBS, TARGETS, n_bins=2) == pytest.approx(0.15)


def test_compute_metrics_by_hand() -> None:
    m = compute_metrics(PROBS, TARGETS)
    assert list(m) == list(METRIC_NAMES)
    assert m == pytest.approx({"accuracy": 0.75, "nll": 0.6192347, "ece": 0.4, "brier": 0.35875})


def test_nll_of_certain_right_answer_is_positive_zero() -> None:
    value = nll([[1.0, 0.0]], [0])
    assert value == 0.0 and math.copysign(1.0, value) == 1.0  # not -0.0


def test_nll_of_zero_probability_is_large_but_finite() -> None:
    value = nll([[1.0, 0.0, 0.0]], [1])
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-12))


# --------------------------------------------------------------------------- ECE edge cases


def test_ece_edge_goes_to_lower_bin() -> None:
    # 5 bins. Confidence 0.4 (correct) lies on the edge between (0.2, 0.4] and (0.4, 0.6].
    # Lower bin (the rule): |1 - 0.4| / 2 + |0 - 0.5| / 2 = 0.3 + 0.25 = 0.55
    # Upper bin, shared with the 0.5 question: |0.5 - 0.45| = 0.05
    probs = [[0.4, 0.3, 0.3], [0.5, 0.25, 0.25]]
    assert ece(probs, [0, 1], n_bins=5) == pytest.approx(0.55)


def test_ece_confidence_one_lands_in_last_bin() -> None:
    # 10 bins. Conf 1.0 (wrong) and conf 0.95 (right) must share the last bin (0.9, 1.0]:
    # |(0 + 1) / 2 - (1.0 + 0.95) / 2| = |0.5 - 0.975| = 0.475
    # (in separate bins it would be (1.0 + 0.05) / 2 = 0.525)
    probs = [[1.0, 0.0], [0.95, 0.05]]
    assert ece(probs, [1, 0], n_bins=10) == pytest.approx(0.475)


def test_ece_perfectly_calibrated_is_zero() -> None:
    # 10 questions at confidence 0.8, 8 of them right; 4 at confidence 0.5, 2 of them right
    # (ties go to choice 0, so targets 0, 0, 1, 1 give 2 right).
    probs = [[0.8, 0.2]] * 10 + [[0.5, 0.5]] * 4
    targets = [0] * 8 + [1] * 2 + [0, 0, 1, 1]
    assert ece(probs, targets) == pytest.approx(0.0, abs=1e-12)


def test_ece_all_confident_all_wrong_is_one() -> None:
    probs = [[1.0, 0.0, 0.0]] * 6
    assert ece(probs, [1, 2, 1, 2, 1, 2]) == pytest.approx(1.0)
    assert accuracy(probs, [1, 2, 1, 2, 1, 2]) == 0.0


# --------------------------------------------------------------------------- references


def _ece_reference(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Independent numpy ECE: np.digitize with right=True gives edges[i-1] < x <= edges[i]."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges, right=True) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = idx == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_numpy_reference(n_bins: int, seed: int) -> None:
    probs, targets = _random_case(seed)
    assert ece(probs, targets, n_bins=n_bins) == pytest.approx(
        _ece_reference(probs, targets, n_bins), abs=1e-12
    )
    assert ece(PROBS, TARGETS, n_bins=n_bins) == pytest.approx(
        _ece_reference(np.array(PROBS), np.array(TARGETS), n_bins), abs=1e-12
    )


def test_ece_matches_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, targets = _random_case(seed=3, c=5)
    # torchmetrics bins are [lo, hi); with continuous random confidences no value sits on an
    # edge, so the two definitions agree. It computes in float32, hence the tolerance.
    ref = tm.multiclass_calibration_error(
        torch.tensor(probs, dtype=torch.float32),
        torch.tensor(targets),
        num_classes=5,
        n_bins=15,
        norm="l1",
    )
    assert ece(probs, targets, n_bins=15) == pytest.approx(float(ref), abs=1e-5)


def test_nll_matches_sklearn() -> None:
    from sklearn.metrics import log_loss

    probs, targets = _random_case(seed=4)
    assert nll(probs, targets) == pytest.approx(log_loss(targets, probs, labels=range(4)), rel=1e-9)


def test_brier_matches_numpy_reference() -> None:
    probs, targets = _random_case(seed=5)
    ref = np.mean(np.sum((probs - np.eye(4)[targets]) ** 2, axis=1))
    assert brier(probs, targets) == pytest.approx(ref, rel=1e-12)


def test_accuracy_matches_sklearn() -> None:
    from sklearn.metrics import accuracy_score

    probs, targets = _random_case(seed=6)
    assert accuracy(probs, targets) == pytest.approx(accuracy_score(targets, probs.argmax(1)))


# --------------------------------------------------------------------------- ensembling


def test_ensemble_probs_is_member_mean() -> None:
    rng = np.random.default_rng(7)
    member_probs = rng.dirichlet(np.ones(4), size=(6, 3))  # [N=6, M=3, C=4]
    out = ensemble_probs(torch.tensor(member_probs))
    assert out.shape == (6, 4)
    np.testing.assert_allclose(out.numpy(), member_probs.mean(axis=1), rtol=1e-12)


def test_ensemble_of_opposite_members_is_uniform() -> None:
    out = ensemble_probs([[[1.0, 0.0], [0.0, 1.0]]])
    assert out.tolist() == [[0.5, 0.5]]


def test_logit_ensemble_is_geometric_and_differs_from_prob_mean() -> None:
    # Member A [0.9, 0.1], member B [0.5, 0.5].
    # Prob mean: [0.7, 0.3].
    # Geometric mean: sqrt(0.9 * 0.5) : sqrt(0.1 * 0.5) = sqrt(9) : 1 = 3 : 1 -> [0.75, 0.25].
    member_probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]], dtype=torch.float64)
    assert ensemble_probs(member_probs)[0].tolist() == pytest.approx([0.7, 0.3])
    from_logprobs = ensemble_probs_from_logits(member_probs.log())
    assert from_logprobs[0].tolist() == pytest.approx([0.75, 0.25])
    # Raw logits shifted by a per-member constant give the same ensemble as log-probabilities.
    shifted = member_probs.log() + torch.tensor([[[3.0], [-7.0]]], dtype=torch.float64)
    assert ensemble_probs_from_logits(shifted)[0].tolist() == pytest.approx(from_logprobs[0].tolist())


def _mixed_choice_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 questions with 3, 4, 5 choices padded to C = 5; M = 2 members."""
    counts = [3, 4, 5]
    mask = torch.tensor([[j < k for j in range(5)] for k in counts])  # [3, 5]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    logits[~mask[:, None, :].expand(-1, 2, -1)] = 50.0  # junk in padded slots must not leak
    member_probs = torch.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
    return logits, member_probs, mask


def test_masked_choices_stay_zero() -> None:
    logits, member_probs, mask = _mixed_choice_case()
    for out in (ensemble_probs(member_probs), ensemble_probs_from_logits(logits, mask)):
        assert torch.all(out[~mask] == 0.0)
        np.testing.assert_allclose(out.sum(dim=1).numpy(), np.ones(3), rtol=1e-12)
    # The masked logit ensemble of the 3-choice question equals the unpadded computation.
    unpadded = ensemble_probs_from_logits(logits[:1, :, :3])
    np.testing.assert_allclose(ensemble_probs_from_logits(logits, mask)[0, :3], unpadded[0])
    metrics = compute_metrics(ensemble_probs(member_probs), [2, 3, 4])
    assert all(math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- evaluate / format


def test_evaluate_ensemble_structure_and_mean_member() -> None:
    rng = np.random.default_rng(8)
    member_probs = rng.dirichlet(np.ones(4), size=(50, 3))
    targets = rng.integers(0, 4, size=50)
    res = evaluate_ensemble(member_probs, targets)
    assert set(res) == {"members", "mean_member", "ensemble", "num_questions", "num_members"}
    assert res["num_questions"] == 50 and res["num_members"] == 3
    assert len(res["members"]) == 3
    for k in METRIC_NAMES:
        assert res["mean_member"][k] == pytest.approx(np.mean([m[k] for m in res["members"]]))
        assert res["members"][1][k] == pytest.approx(
            compute_metrics(member_probs[:, 1], targets)[k]
        )
    assert res["ensemble"] == pytest.approx(
        compute_metrics(member_probs.mean(axis=1), targets)
    )
    json.dumps(res)  # plain floats and ints, ready for results.json


def test_evaluate_ensemble_by_hand() -> None:
    # One question, target 0; members [1, 0] and [0, 1]; ensemble [0.5, 0.5].
    # Members: NLL 0 and -ln 1e-12 = 27.631; mean member NLL 13.816; ensemble NLL ln 2.
    res = evaluate_ensemble([[[1.0, 0.0], [0.0, 1.0]]], [0])
    assert res["mean_member"]["nll"] == pytest.approx(-math.log(1e-12) / 2)
    assert res["mean_member"]["accuracy"] == pytest.approx(0.5)
    assert res["ensemble"]["nll"] == pytest.approx(math.log(2))
    # Brier: members 0 and 2, mean 1; ensemble 0.25 + 0.25 = 0.5.
    assert res["mean_member"]["brier"] == pytest.approx(1.0)
    assert res["ensemble"]["brier"] == pytest.approx(0.5)


def test_format_table_rows() -> None:
    probs, targets = _random_case(seed=9, n=40)
    member_probs = np.stack([probs, np.roll(probs, 1, axis=1), probs[:, ::-1]], axis=1)
    res = evaluate_ensemble(member_probs, targets)
    text = format_table(res, title="ARC-Easy validation")
    lines = text.splitlines()
    assert lines[0] == "ARC-Easy validation"
    for label in ["member 0", "member 1", "member 2", "mean member", "ensemble"]:
        assert any(line.startswith(label) for line in lines), label
    assert "member 3" not in text
    # Header and metric rows share one width, so columns line up in a terminal.
    table = [line for line in lines[1:] if not line.startswith(("-", "N ="))]
    assert len({len(line) for line in table}) == 1
    assert f"{100 * res['ensemble']['accuracy']:.2f}" in text


def test_format_comparison_rows() -> None:
    res = evaluate_ensemble([[[1.0, 0.0], [0.0, 1.0]]], [0])
    text = format_comparison(res)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["mean", "ensemble", "change"]
    change = lines[4]
    # ensemble - mean member. Accuracy: the ensemble's tie [0.5, 0.5] goes to choice 0 (right),
    # members score 1 and 0 -> 100 - 50 = +50 pp. NLL: ln 2 - 13.8155 = -13.1224.
    # ECE: ensemble |1 - 0.5| = 0.5, members 0 and 1 -> mean 0.5 -> +0. Brier: 0.5 - 1 = -0.5.
    assert change.split()[1:] == ["+50.00", "-13.1224", "+0.0000", "-0.5000"]


# --------------------------------------------------------------------------- input types


def test_numpy_and_torch_inputs_agree() -> None:
    probs, targets = _random_case(seed=10)
    from_numpy = compute_metrics(probs.astype(np.float32), targets)
    from_torch = compute_metrics(torch.tensor(probs, dtype=torch.float32), torch.tensor(targets))
    assert from_numpy == pytest.approx(from_torch, rel=1e-12)
    member_probs = np.stack([probs, probs[:, ::-1]], axis=1)
    assert evaluate_ensemble(member_probs, targets) == evaluate_ensemble(
        torch.tensor(member_probs.copy()), torch.tensor(targets)
    )


def test_integral_float_targets_accepted() -> None:
    assert accuracy(PROBS, np.array(TARGETS, dtype=float)) == pytest.approx(0.75)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: accuracy([0.2, 0.8], [1]), r"`probs` should have shape \[N, C\].*got shape \(2,\)"),
        (lambda: nll(PROBS, [0, 1, 1]), r"`targets` should have shape \[N\] with N = 4.*\(3,\)"),
        (lambda: brier(PROBS, [[0, 1, 1, 2]]), r"`targets` should have shape \[N\].*\(1, 4\)"),
        (lambda: ece(PROBS, [0, 1, 1, 3]), r"`targets` .*\[0, 3\).*got values in \[0, 3\]"),
        (lambda: ece(PROBS, [0, -1, 1, 2]), r"`targets` .*got values in \[-1, 2\]"),
        (lambda: accuracy(np.zeros((0, 4)), []), r"`probs` .*at least one question.*\(0, 4\)"),
        (lambda: accuracy(PROBS, [0.5, 1, 1, 2]), r"`targets` should hold integer"),
        (lambda: ece(PROBS, TARGETS, n_bins=0), r"`n_bins` should be a positive integer"),
        (lambda: ensemble_probs(PROBS), r"`member_probs` should have shape \[N, M, C\].*\(4, 3\)"),
        (lambda: ensemble_probs(np.zeros((2, 0, 3))), r"`member_probs` .*at least one member"),
        (
            lambda: ensemble_probs_from_logits(np.zeros((2, 3, 4)), np.ones((2, 5), dtype=bool)),
            r"`choice_mask` should have shape \[N, C\] = \[2, 4\].*\(2, 5\)",
        ),
        (
            lambda: evaluate_ensemble(np.full((4, 2, 3), 1 / 3), [0, 1]),
            r"`targets` .*N = 4 to match `member_probs`.*\(2,\)",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()


# --------------------------------------------------------------------------- MCE, adaptive ECE

# Imported here, not at the top, so this section is a pure append to the file.
from loraens.metrics import (  # noqa: E402
    CALIBRATION_METRIC_NAMES,
    adaptive_ece,
    calibration_metrics,
    mce,
)


def test_mce_by_hand() -> None:
    # 15 bins: one question per bin (see test_ece_by_hand_15_bins), gaps
    # |1 - 0.7| = 0.3, |0 - 0.6| = 0.6, |1 - 0.8| = 0.2, |1 - 0.5| = 0.5 -> max 0.6.
    assert mce(PROBS, TARGETS) == pytest.approx(0.6)
    # 2 bins: bin 0 {q3}: |1 - 0.5| = 0.5; bin 1 {q0, q1, q2}: |2/3 - 0.7| = 1/30 -> max 0.5.
    assert mce(PROBS, TARGETS, n_bins=2) == pytest.approx(0.5)


def test_mce_skips_empty_bins_and_can_reach_one() -> None:
    # 10 bins, one question, confidence 1.0 and wrong: the only non-empty bin has gap |0 - 1| = 1.
    # The 9 empty bins would give gap 0 (or nan), neither of which may win or poison the max.
    assert mce([[1.0, 0.0]], [1], n_bins=10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("n_bins", "expected"),
    [
        # Sorted by confidence: q3 0.5 right, q1 0.6 wrong, q0 0.7 right, q2 0.8 right.
        # 1 bin: |3 - (0.5 + 0.6 + 0.7 + 0.8)| / 4 = |3 - 2.6| / 4 = 0.1
        (1, 0.1),
        # 2 bins [q3, q1], [q0, q2]: (|1 - 1.1| + |2 - 1.5|) / 4 = (0.1 + 0.5) / 4 = 0.15
        (2, 0.15),
        # 4 bins, one question each: (0.5 + 0.6 + 0.3 + 0.2) / 4 = 0.4
        (4, 0.4),
        # 10 bins > N = 4: array_split makes 6 empty groups, which add nothing -> 0.4 again.
        (10, 0.4),
    ],
)
def test_adaptive_ece_by_hand(n_bins: int, expected: float) -> None:
    assert adaptive_ece(PROBS, TARGETS, n_bins=n_bins) == pytest.approx(expected)


def test_adaptive_ece_ties_keep_input_order() -> None:
    # Three questions at confidence 0.6 and one at 0.9 (right), 2 bins of 2 questions each; the
    # cut goes through the tied run, whose members keep their input order (stable sort).
    # Order right, right, wrong @ 0.6: bins [r, r], [w@0.6, r@0.9]:
    #   (|2 - 1.2| + |1 - 1.5|) / 4 = (0.8 + 0.5) / 4 = 0.325
    # Order wrong, right, right @ 0.6: bins [w, r], [r@0.6, r@0.9]:
    #   (|1 - 1.2| + |2 - 1.5|) / 4 = (0.2 + 0.5) / 4 = 0.175
    probs = [[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1]]
    assert adaptive_ece(probs, [0, 0, 1, 0], n_bins=2) == pytest.approx(0.325)
    assert adaptive_ece(probs, [1, 0, 0, 0], n_bins=2) == pytest.approx(0.175)


def _adaptive_ece_reference(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Independent numpy adaptive ECE: stable argsort, np.array_split, size-weighted gaps."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(float)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for idx in np.array_split(order, n_bins):
        if len(idx):
            total += len(idx) / len(conf) * abs(correct[idx].mean() - conf[idx].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 3, 15, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_ece_matches_numpy_reference(n_bins: int, seed: int) -> None:
    probs, targets = _random_case(seed, n=301)  # 301 is not a multiple of 3, 15 or 40
    assert adaptive_ece(probs, targets, n_bins=n_bins) == pytest.approx(
        _adaptive_ece_reference(probs, targets, n_bins), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_mce_at_least_ece(seed: int) -> None:
    # ECE is a weighted mean of the per-bin gaps (weights |B|/N sum to 1), MCE their max.
    probs, targets = _random_case(seed, n=200)
    for n_bins in (1, 5, 15, 40):
        assert mce(probs, targets, n_bins=n_bins) >= ece(probs, targets, n_bins=n_bins) - 1e-12


def test_one_bin_makes_all_three_equal() -> None:
    # With a single bin every definition is |overall accuracy - mean confidence|.
    probs, targets = _random_case(seed=2, n=100)
    gap = abs(accuracy(probs, targets) - probs.max(1).mean())
    for fn in (ece, mce, adaptive_ece):
        assert fn(probs, targets, n_bins=1) == pytest.approx(gap, abs=1e-12)


def test_calibration_metrics_by_hand() -> None:
    m = calibration_metrics(PROBS, TARGETS, n_bins=2)
    assert tuple(m) == CALIBRATION_METRIC_NAMES
    # ece and mce from the 2-bin cases above, adaptive_ece from test_adaptive_ece_by_hand.
    assert m == pytest.approx({"ece": 0.15, "mce": 0.5, "adaptive_ece": 0.15})
    # compute_metrics keeps its four columns.
    assert tuple(compute_metrics(PROBS, TARGETS)) == METRIC_NAMES


def test_calibration_metrics_torch_and_numpy_agree() -> None:
    probs, targets = _random_case(seed=11, n=100)
    from_torch = calibration_metrics(torch.tensor(probs), torch.tensor(targets))
    assert calibration_metrics(probs, targets) == pytest.approx(from_torch, abs=1e-12)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: mce(PROBS, TARGETS, n_bins=0), r"`n_bins` should be a positive integer.*0"),
        (lambda: adaptive_ece(PROBS, TARGETS, n_bins=True), r"`n_bins` should be .*True"),
        (lambda: mce([0.2, 0.8], [1]), r"`probs` should have shape \[N, C\].*got shape \(2,\)"),
        (
            lambda: adaptive_ece(PROBS, [0, 1]),
            r"`targets` should have shape \[N\] with N = 4.*\(2,\)",
        ),
        (lambda: calibration_metrics(PROBS, [0, 1, 1, 5]), r"`targets` .*got values in \[0, 5\]"),
    ],
)
def test_calibration_bad_inputs_raise_clear_errors(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()
