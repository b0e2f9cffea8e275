"""backpack_nb.stats in float64: Spearman (ties) against its definition and scipy, each
bootstrap against a direct loop over the same draws, and every interval against the numbers
the code gave before stats.py existed (lexsim.py, evaluation.py and reports.py at ce0edcb)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from backpack_nb import stats
from backpack_nb.evaluation import WindowScores

LN2 = math.log(2)

# ----------------------------------------------------------------------------------------
# Spearman


def _reference_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks by definition: 1 + #smaller + (#equal - 1) / 2."""
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x], dtype=float)


def _reference_spearman(x, y) -> float:
    rx, ry = _reference_ranks(np.asarray(x, float)), _reference_ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def test_spearman_with_ties_matches_definition():
    # By hand: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4), centred (-1.5, 0, 0, 1.5) and
    # (-1.5, .5, -.5, 1.5): rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert stats.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-15)
    x = [1, 2, 2, 3, 4, 4, 4]
    y = [2, 1, 3, 3, 5, 0, 5]
    np.testing.assert_array_equal(_reference_ranks(np.array(x, float)), [1, 2.5, 2.5, 4, 6, 6, 6])
    assert stats.spearman(x, y) == pytest.approx(_reference_spearman(x, y), abs=1e-12)
    rng = np.random.default_rng(0)
    for n in (2, 5, 40, 300):
        a, b = rng.integers(0, 6, n), rng.normal(size=n).round(1)  # many ties
        assert stats.spearman(a, b) == pytest.approx(_reference_spearman(a, b), abs=1e-12)
    assert np.isnan(stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant side
    assert np.isnan(stats.spearman([1.0], [2.0]))
    with pytest.raises(ValueError):
        stats.spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_spearman_matches_scipy():
    rng = np.random.default_rng(1)
    for n in (3, 17, 170, 1000):
        a = rng.integers(0, 7, n).astype(float)
        b = a + rng.normal(scale=2.0, size=n).round(0)
        assert stats.spearman(a, b) == pytest.approx(sps.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_rows_matches_definition_row_by_row():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=(30, 12)).astype(float)  # rows full of ties
    y = rng.normal(size=(30, 12)).round(0)
    x[7] = 2.0  # a constant row: no rho
    rho = stats.spearman_rows(x, y)
    assert rho.shape == (30,) and rho.dtype == np.float64
    assert np.isnan(rho[7])
    for i in range(30):
        if i != 7:
            assert rho[i] == pytest.approx(_reference_spearman(x[i], y[i]), abs=1e-12)
            assert rho[i] == pytest.approx(stats.spearman(x[i], y[i]), abs=1e-12)


def test_bootstrap_interval():
    rng = np.random.default_rng(2)
    x = rng.normal(size=160)
    y = x + rng.normal(size=160)
    rho = stats.spearman(x, y)
    lo, hi = stats.bootstrap_spearman(x, y, n_boot=500, seed=3)
    assert lo < rho < hi and 0.1 < hi - lo < 0.4
    assert stats.bootstrap_spearman(x, y, n_boot=500, seed=3) == [lo, hi]  # seeded


# ----------------------------------------------------------------------------------------
# each bootstrap against a direct loop over the same draws


def test_bootstraps_equal_a_direct_loop():
    rng = np.random.default_rng(6)
    n, n_boot = 37, 300
    x = rng.integers(0, 5, n).astype(float)
    y = x + rng.normal(size=n).round(0)
    hits = (rng.random(n) < 0.4).astype(float)
    nats, nbytes = rng.uniform(10, 90, n), rng.integers(0, 200, n)
    nats_b = nats + rng.normal(size=n)
    picks = np.random.default_rng(11).integers(0, n, size=(n_boot, n))

    def interval(values):
        values = np.asarray(values)
        return list(np.percentile(values[np.isfinite(values)], [2.5, 97.5]))

    rho = [sps.spearmanr(x[p], y[p]).statistic if np.ptp(x[p]) and np.ptp(y[p]) else np.nan for p in picks]
    assert stats.bootstrap_spearman(x, y, n_boot, 11) == pytest.approx(interval(rho), abs=1e-12)
    assert stats.bootstrap_mean(hits, n_boot, 11) == pytest.approx(interval([hits[p].mean() for p in picks]), abs=1e-15)
    bpb = [nats[p].sum() / LN2 / max(nbytes[p].sum(), 1) for p in picks]
    assert stats.bootstrap_ratio(nats, nbytes, n_boot, 11, unit=LN2) == pytest.approx(interval(bpb), abs=1e-15)
    diff = [(nats[p].sum() - nats_b[p].sum()) / LN2 / max(nbytes[p].sum(), 1) for p in picks]
    assert stats.paired_bootstrap_ratio_difference(nats, nats_b, nbytes, n_boot, 11, unit=LN2) == pytest.approx(
        interval(diff), abs=1e-15)
    assert stats.ratio(nats, nbytes, unit=LN2) == pytest.approx(nats.sum() / LN2 / nbytes.sum(), abs=1e-15)


def test_a_generator_is_shared_an_int_is_not():
    a, b, den = np.arange(1.0, 11.0), np.arange(10.0) * 0.9, np.full(10, 3)
    g = np.random.default_rng(4)
    first = stats.paired_bootstrap_ratio_difference(a, b, den, 200, g)
    second = stats.paired_bootstrap_ratio_difference(a, b, den, 200, g)
    assert first != second  # the Generator moved on
    assert stats.paired_bootstrap_ratio_difference(a, b, den, 200, 4) == first  # a fresh one per int
    assert stats.bootstrap_mean(a, 200, 4) == stats.bootstrap_mean(a, 200, 4)
    # A single unit still draws, so the intervals after it keep their draws.
    g1, g2 = np.random.default_rng(0), np.random.default_rng(0)
    stats.paired_bootstrap_ratio_difference(a[:1], b[:1], den[:1], 50, g1)
    g2.integers(0, 1, size=(50, 1))
    assert g1.integers(0, 100) == g2.integers(0, 100)


def test_undefined_intervals_are_nan():
    nan2 = lambda ci: len(ci) == 2 and all(math.isnan(v) for v in ci)  # noqa: E731
    assert nan2(stats.percentile_interval([]))
    assert nan2(stats.bootstrap_mean([1.0], 100))
    assert nan2(stats.bootstrap_mean([1.0, 0.0], 0))
    assert nan2(stats.bootstrap_spearman([1.0, 2.0], [2.0, 1.0], 100))
    assert nan2(stats.bootstrap_spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], 100))  # never a rho
    assert nan2(stats.bootstrap_ratio([1.0], [3], 100))
    assert nan2(stats.bootstrap_ratio([1.0, 2.0], [0, 0], 100))
    assert math.isnan(stats.ratio([1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ratio_difference([1.0, 2.0], [1.0], [1, 1], 10)


# ----------------------------------------------------------------------------------------
# the numbers the code gave before stats.py (computed at ce0edcb from the same data)


def _data():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 6, 60).astype(float)
    y = (x + rng.normal(scale=2.0, size=60)).round(0)
    hits = (rng.random(50) < 0.3).astype(float)
    nats, toks, nbytes = rng.uniform(50, 200, 40), rng.integers(30, 60, 40), rng.integers(100, 300, 40)
    nbytes[3] = 0
    nats_b = nats + rng.normal(scale=5, size=40)
    return x, y, hits, nats, toks, nbytes, nats_b


def test_intervals_equal_those_before_stats_py():
    x, y, hits, nats, toks, nbytes, nats_b = _data()
    # lexsim.spearman, lexsim.bootstrap_spearman, lexsim._bootstrap_mean
    assert stats.spearman(x, y) == pytest.approx(0.6064293170583327, abs=1e-12)
    assert stats.bootstrap_spearman(x, y, n_boot=400, seed=5) == pytest.approx(
        [0.38213850986880304, 0.748678818205913], abs=1e-12)
    assert stats.bootstrap_spearman(x, y) == pytest.approx([0.39467943901655866, 0.7529886420636088], abs=1e-12)
    assert stats.bootstrap_mean(hits, 300, 2) == pytest.approx([0.1, 0.34], abs=1e-12)

    # evaluation.WindowScores.summary
    ws = WindowScores(nats, toks, nbytes)
    s = ws.summary(n_boot=500, seed=3)
    assert (s["tokens"], s["bytes"], s["windows"]) == (1749, 7684, 40)
    assert s["loss"] == pytest.approx(2.998874636993256, abs=1e-12)
    assert s["ppl"] == pytest.approx(20.0629461167768, abs=1e-10)
    assert s["bits_per_byte"] == pytest.approx(0.9847711193062494, abs=1e-12)
    assert s["bpb_ci95"] == pytest.approx([0.8578984456475696, 1.1167445687271984], abs=1e-12)
    assert ws.summary()["bpb_ci95"] == pytest.approx([0.8525073146829284, 1.130562246591871], abs=1e-12)

    # reports.paired_bpb_difference: one Generator (seed 4), languages in turn, then "all"
    g = np.random.default_rng(4)
    want = {"en": (slice(0, 25), [-0.001712133879728454, 0.025973092799401343]),
            "fr": (slice(25, 40), [-0.003616152727592082, 0.03826446038571319]),
            "all": (slice(0, 40), [0.0013624451795635902, 0.027015612871089056])}
    for lang, (part, ci) in want.items():
        got = stats.paired_bootstrap_ratio_difference(nats[part], nats_b[part], nbytes[part], 700, g, unit=LN2)
        assert got == pytest.approx(ci, abs=1e-12), lang
