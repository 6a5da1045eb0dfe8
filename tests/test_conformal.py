"""Split-conformal sets (LAC, APS) and SGR's risk-controlled abstention: the guarantees hold on synthetic
data over many random calibration/test splits, and the sets and thresholds agree with MAPIE and crepes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from loraens.conformal import (
    aps_scores,
    binomial_upper_bound,
    conformal_quantile,
    correct_answers,
    coverage_threshold,
    evaluate_selective,
    evaluate_sets,
    guarantee_summary,
    lac_scores,
    prediction_sets,
    sgr_threshold,
    true_scores,
)

TRIALS = 200


def _draw(rng: np.random.Generator, n: int, c: int = 4, sharpness: float = 2.0, honesty: float = 0.6):
    """n questions: the model's probabilities [n, c] and true answers drawn from a LESS confident
    distribution (the model is over-confident), so nothing is calibrated by construction."""
    logits = rng.normal(size=(n, c)) * sharpness
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    truth = np.exp(honesty * (logits - logits.max(1, keepdims=True)))
    truth /= truth.sum(1, keepdims=True)
    targets = (truth.cumsum(1) > rng.random((n, 1))).argmax(1)
    return probs, targets


# ---------------------------------------------------------------- the guarantees, over 200 random splits


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_conformal_coverage_holds_over_random_splits(method, alpha):
    rng = np.random.default_rng(1)
    n_cal, n_test = 300, 1000
    coverages, sizes = [], []
    for _ in range(TRIALS):
        cal_p, cal_t = _draw(rng, n_cal)
        test_p, test_t = _draw(rng, n_test)
        q = conformal_quantile(true_scores(cal_p, cal_t, method=method), alpha)
        ev = evaluate_sets(prediction_sets(test_p, q, method=method), test_t)
        coverages.append(ev.coverage)
        sizes.append(ev.mean_size)
    mean = float(np.mean(coverages))
    # Binomial noise of the mean over TRIALS x n_test test questions, plus the calibration draw's:
    # the coverage given a calibration split is Beta-distributed with variance ~ alpha (1 - alpha) / (n_cal + 2).
    se = math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / (n_cal + 2)) / TRIALS)
    assert mean >= 1 - alpha - 3 * se, f"{method} alpha={alpha}: mean coverage {mean:.4f} below 1 - alpha"
    if method == "lac":  # continuous scores: coverage is also at most 1 - alpha + 1 / (n + 1)
        assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se
    assert 1.0 < np.mean(sizes) < 4.0  # informative sets: neither singletons always nor every choice


def test_sgr_realised_risk_exceeds_its_target_in_at_most_delta_of_splits():
    rng = np.random.default_rng(2)
    target, delta = 0.1, 0.1
    exceeded, coverages = 0, []
    for _ in range(TRIALS):
        cal_p, cal_t = _draw(rng, 1000, sharpness=3.0, honesty=0.8)
        test_p, test_t = _draw(rng, 20000, sharpness=3.0, honesty=0.8)  # large: realised risk ~ true risk
        rule = sgr_threshold(correct_answers(cal_p, cal_t), 1 - cal_p.max(1), target, delta)
        assert rule.bound <= target and rule.risk <= target
        ev = evaluate_selective(correct_answers(test_p, test_t), 1 - test_p.max(1), rule.threshold)
        exceeded += ev.risk > target
        coverages.append(ev.coverage)
    # The guarantee: P(risk > target) <= delta; allow the binomial noise of TRIALS splits.
    assert exceeded / TRIALS <= delta + 3 * math.sqrt(delta * (1 - delta) / TRIALS)
    assert np.mean(coverages) > 0.15  # and it still answers a share of the questions
    accuracy = np.mean([correct_answers(*_draw(rng, 20000, sharpness=3.0, honesty=0.8))])
    assert accuracy < 1 - target  # answering everything would break the target: abstention is needed


# ---------------------------------------------------------------- agreement with the reference libraries


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(7)
    cal_p, cal_t = _draw(rng, 200, c=5)
    test_p, test_t = _draw(rng, 300, c=5)
    return cal_p, cal_t, test_p, test_t


class _Identity:
    """A 'classifier' whose predict_proba returns its input: MAPIE then works on our probabilities."""

    _estimator_type = "classifier"

    def __init__(self, c: int):
        self.classes_ = np.arange(c)

    def fit(self, x, y):
        return self

    def predict_proba(self, x):
        return np.asarray(x)

    def predict(self, x):
        return np.asarray(x).argmax(1)

    def __sklearn_is_fitted__(self):
        return True


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
def test_lac_sets_and_quantile_agree_with_mapie(fixed, alpha):
    mapie = pytest.importorskip("mapie.classification")
    cal_p, cal_t, test_p, _ = fixed
    ref = mapie.SplitConformalClassifier(estimator=_Identity(5), confidence_level=1 - alpha,
                                         conformity_score="lac", prefit=True).conformalize(cal_p, cal_t)
    _, ref_sets = ref.predict_set(test_p)
    q = conformal_quantile(true_scores(cal_p, cal_t, method="lac"), alpha)
    assert q == pytest.approx(float(np.ravel(ref._mapie_classifier.conformity_score_function_.quantiles_)[0]))
    np.testing.assert_array_equal(prediction_sets(test_p, q, method="lac"), ref_sets[:, :, 0])


def test_aps_scores_agree_with_mapie(fixed):
    aps = pytest.importorskip("mapie.conformity_scores")
    cal_p, cal_t, _, _ = fixed
    score = aps.APSConformityScore()
    # MAPIE's APS score before its randomisation: the cumulated probability down to the true label.
    ref, _ = score.get_true_label_cumsum_proba(cal_t, cal_p, np.arange(5))
    np.testing.assert_allclose(true_scores(cal_p, cal_t, method="aps"), np.ravel(ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
def test_aps_sets_agree_with_mapie_at_the_same_threshold(fixed, alpha):
    """MAPIE calibrates APS with randomised scores; given its threshold, the sets (include_last_label=False) match."""
    mapie = pytest.importorskip("mapie.classification")
    cal_p, cal_t, test_p, _ = fixed
    ref = mapie.SplitConformalClassifier(estimator=_Identity(5), confidence_level=1 - alpha, conformity_score="aps",
                                         prefit=True, random_state=0).conformalize(cal_p, cal_t)
    _, ref_sets = ref.predict_set(test_p, conformity_score_params={"include_last_label": False})
    q = float(np.ravel(ref._mapie_classifier.conformity_score_function_.quantiles_)[0])
    np.testing.assert_array_equal(prediction_sets(test_p, q, method="aps"), ref_sets[:, :, 0])


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
def test_quantile_agrees_with_mapie(fixed, alpha):
    utils = pytest.importorskip("mapie.utils")
    cal_p, cal_t, _, _ = fixed
    for method in ("lac", "aps"):
        scores = true_scores(cal_p, cal_t, method=method)
        ref = utils._compute_classification_quantile(scores, np.array([alpha]))
        assert conformal_quantile(scores, alpha) == pytest.approx(float(np.ravel(ref)[0]))


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_sets_agree_with_crepes_p_values(fixed, method, alpha):
    """crepes: a choice is in the set when its p-value exceeds alpha. For LAC that is our set exactly; for APS
    it is the score rule {y: s(x, y) <= q}, which our sets (the top choice always included) contain."""
    crepes = pytest.importorskip("crepes")
    cal_p, cal_t, test_p, _ = fixed
    scores_cal = true_scores(cal_p, cal_t, method=method)
    scores_test = lac_scores(test_p) if method == "lac" else aps_scores(test_p)
    cc = crepes.ConformalClassifier().fit(scores_cal)
    ref = cc.predict_set(scores_test, confidence=1 - alpha, smoothing=False).astype(bool)
    q = conformal_quantile(scores_cal, alpha)
    ours = prediction_sets(test_p, q, method=method)
    if method == "lac":
        np.testing.assert_array_equal(ours, ref)
    else:
        np.testing.assert_array_equal(ref, scores_test - q <= 1e-8)  # crepes' set is the score rule
        assert (ours | ~ref).all() and ours.any(axis=1).all()  # ours contains it and is never empty


def test_lac_nonconformity_is_crepes_hinge(fixed):
    extras = pytest.importorskip("crepes.extras")
    cal_p, cal_t, _, _ = fixed
    np.testing.assert_allclose(true_scores(cal_p, cal_t, method="lac"), extras.hinge(cal_p, np.arange(5), cal_t))


def test_binomial_bound_is_the_exact_clopper_pearson_upper_limit():
    for errors, n, delta in [(0, 10, 0.05), (3, 50, 0.1), (17, 200, 0.01), (99, 100, 0.2)]:
        ref = binomtest(errors, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact").high
        assert binomial_upper_bound(errors, n, delta) == pytest.approx(ref, rel=1e-9)
    assert binomial_upper_bound(0, 0, 0.1) == 1.0 and binomial_upper_bound(5, 5, 0.1) == 1.0


def _sgr_paper(correct, kappa, r, delta):
    """Geifman & El-Yaniv (2017), Algorithm 1, transcribed: kappa = confidence (higher = more certain),
    S sorted by kappa ascending, z_min = 1, z_max = m, k = ceil(log2 m) steps at delta / k."""
    m = len(correct)
    order = np.argsort(kappa, kind="stable")
    kappa_s = kappa[order]
    z_min, z_max = 1, m
    k = math.ceil(math.log2(m))
    best = None
    for _ in range(k):
        z = math.ceil((z_min + z_max) / 2)
        theta = kappa_s[z - 1]
        covered = kappa >= theta
        risk = 1 - correct[covered].mean()
        b = binomtest(int(round(risk * covered.sum())), int(covered.sum())).proportion_ci(
            confidence_level=1 - 2 * delta / k, method="exact").high
        if b <= r:
            z_max = z
            best = (theta, b, covered.sum())
        else:
            z_min = z
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgr_agrees_with_the_papers_algorithm(seed):
    rng = np.random.default_rng(seed)
    p, t = _draw(rng, 1000, sharpness=3.0, honesty=0.8)
    correct = correct_answers(p, t)
    kappa = p.max(1)
    ours = sgr_threshold(correct, 1 - kappa, 0.1, 0.1)
    ref = _sgr_paper(correct, kappa, 0.1, 0.1)
    assert ref is not None and ours.threshold is not None
    assert ours.answered == ref[2]
    assert 1 - ours.threshold == pytest.approx(ref[0])
    assert ours.bound == pytest.approx(ref[1], rel=1e-9)


# ---------------------------------------------------------------- edges


def test_quantile_is_infinite_when_the_split_is_too_small():
    assert conformal_quantile([0.1, 0.2, 0.3], 0.1) == math.inf  # ceil(4 * 0.9) = 4 > 3
    assert conformal_quantile(np.arange(1, 10) / 10, 0.1) == 0.9  # ceil(10 * 0.9) = 9: the largest
    sets = prediction_sets(np.array([[0.7, 0.3, 0.0]]), math.inf, np.array([[True, True, False]]))
    np.testing.assert_array_equal(sets, [[True, True, False]])  # every real choice, never padding


def test_padded_choices_are_never_in_a_set_and_aps_is_cumulative():
    p = np.array([[0.5, 0.2, 0.3, 0.0], [0.25, 0.25, 0.5, 0.0]])
    mask = np.array([[True, True, True, False], [True, True, True, False]])
    np.testing.assert_allclose(aps_scores(p, mask)[:, :3], [[0.5, 1.0, 0.8], [0.75, 1.0, 0.5]])
    assert np.isinf(aps_scores(p, mask)[:, 3]).all() and np.isinf(lac_scores(p, mask)[:, 3]).all()
    # APS: the choices whose running total (in probability order) is at most q, ties with the last one
    # taken included; the top choice always, even when it alone holds more than q.
    np.testing.assert_array_equal(prediction_sets(p, 0.85, mask, "aps"), [[True, False, True, False],
                                                                          [True, True, True, False]])
    np.testing.assert_array_equal(prediction_sets(p, 0.4, mask, "aps"), [[True, False, False, False],
                                                                         [False, False, True, False]])


def test_sgr_answers_nothing_when_no_threshold_meets_the_target():
    correct = np.array([True, False] * 50)
    rule = sgr_threshold(correct, np.linspace(0, 1, 100), 0.05, 0.1)
    assert rule.threshold is None and rule.coverage == 0.0 and rule.answered == 0
    ev = evaluate_selective(correct, np.linspace(0, 1, 100), None)
    assert ev.coverage == 0.0 and ev.risk == 0.0


def test_sgr_keeps_ties_together():
    # disagreement-like scores: many ties; answered = every question at or below the threshold
    u = np.repeat([0.0, 0.25, 0.5, 0.75], 100)
    correct = np.concatenate([np.ones(100), np.r_[np.ones(90), np.zeros(10)], np.zeros(100), np.zeros(100)]) > 0
    rule = sgr_threshold(correct, u, 0.1, 0.1)
    assert rule.threshold == 0.25 and rule.answered == 200  # 10 errors in 200: bound 0.097; never 150 of them


def test_coverage_threshold_answers_the_most_certain_share():
    u = np.arange(100) / 100
    correct = u < 0.5
    c = coverage_threshold(correct, u, 0.8)
    assert c.threshold == pytest.approx(0.79) and c.coverage == 0.8 and c.risk == pytest.approx(30 / 80)


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile([0.1], 1.5)
    with pytest.raises(ValueError, match="set method"):
        prediction_sets(np.ones((1, 2)) / 2, 0.5, method="raps")
    with pytest.raises(ValueError, match="target risk"):
        sgr_threshold([True], [0.1], 0.0)


def test_guarantee_summary_single_member_vs_ensemble():
    rng = np.random.default_rng(3)
    n, m, c = 400, 4, 4
    targets = rng.integers(0, c, 2 * n)
    logits = rng.normal(size=(2 * n, m, c)) * 1.5 + 1.5 * np.eye(c)[targets][:, None]
    mp = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out = guarantee_summary(mp[:n], targets[:n], mp[n:], targets[n:], alphas=(0.1,), risks=(0.2,))
    single = guarantee_summary(mp[:n], targets[:n], mp[n:], targets[n:], alphas=(0.1,), risks=(0.2,), member=0)
    for res in (out, single):
        assert res["sets"]["lac"]["0.1"]["coverage"] > 0.85
        assert res["risk"]["0.2"]["bound"] <= 0.2
    # Averaging members that err independently makes sharper, better-ranked probabilities here.
    assert out["sets"]["lac"]["0.1"]["mean_size"] < single["sets"]["lac"]["0.1"]["mean_size"]
