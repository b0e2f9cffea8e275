"""Bootstrap intervals and rank correlations: every interval this project reports comes from
here (bits per byte in eval.json, the paired Backpack - Transformer difference in the
reports, Spearman's rho and precision@1 of the Multi-SimLex tables).

The bootstrap is the percentile bootstrap: ``n_boot`` resamples of the units (evaluation
windows, word pairs, queries), drawn with replacement as one ``(n_boot, n)`` array of indices
by numpy's default generator, the statistic of each resample, and the 2.5th and 97.5th
percentiles of those (numpy's default, linear, method). The draws are part of every stored
interval: changing the generator, the order or the shape of the draws moves them all.

Ranks and Spearman's rho come from :mod:`scipy.stats` (ties get their average rank).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

# 95% intervals only: every table and eval.json field says "ci95".
_PERCENTILES = (2.5, 97.5)

Seed = int | np.random.Generator


def _nan_interval() -> list[float]:
    return [float("nan"), float("nan")]


def resample(n: int, n_boot: int, seed: Seed = 0) -> np.ndarray:
    """``(n_boot, n)`` indices into ``n`` units, drawn with replacement. ``seed`` is an int
    (a fresh generator) or a Generator, which is advanced: several intervals drawn from one
    Generator, one after the other, get different resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(samples: ArrayLike) -> list[float]:
    """The 2.5th and 97.5th percentiles of bootstrap statistics; NaNs for no samples."""
    samples = np.asarray(samples, dtype=float)
    if not samples.size:
        return _nan_interval()
    return [float(v) for v in np.percentile(samples, _PERCENTILES)]


def bootstrap_mean(values: ArrayLike, n_boot: int = 1000, seed: Seed = 0) -> list[float]:
    """95% interval of the mean of ``values`` (e.g. 0/1 hits of retrieval queries) over
    resamples of them; NaNs for fewer than two values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or n_boot < 1:
        return _nan_interval()
    picks = resample(len(values), n_boot, seed)
    return percentile_interval(values[picks].mean(1))


def ratio(numerator: ArrayLike, denominator: ArrayLike, *, unit: float = 1.0) -> float:
    """``sum(numerator) / unit / sum(denominator)``: with nats and bytes per window and
    ``unit = ln 2``, bits per byte. NaN when the denominator sums to zero."""
    num, den = np.sum(numerator), np.sum(denominator)
    return float(num / unit / den) if den else float("nan")


def bootstrap_ratio(numerator: ArrayLike, denominator: ArrayLike, n_boot: int = 1000, seed: Seed = 0, *,
                    unit: float = 1.0) -> list[float]:
    """95% interval of :func:`ratio` over units (windows) resampled with replacement, each
    unit keeping its numerator and denominator together. NaNs for fewer than two units or a
    denominator that sums to zero; a resample whose denominator sums to zero divides by 1."""
    num, den = np.asarray(numerator), np.asarray(denominator)
    if len(num) < 2 or not den.sum() or n_boot < 1:
        return _nan_interval()
    picks = resample(len(num), n_boot, seed)
    return percentile_interval(num[picks].sum(1) / unit / np.maximum(den[picks].sum(1), 1))


def paired_bootstrap_ratio_difference(numerator_a: ArrayLike, numerator_b: ArrayLike, denominator: ArrayLike,
                                      n_boot: int = 1000, seed: Seed = 0, *, unit: float = 1.0) -> list[float]:
    """95% interval of ``ratio(a) - ratio(b)`` when both are measured on the same units
    (two models scored on the same windows): each resample picks the same units for both,
    so what the units share (how hard a text is) cancels out.

    It always draws, even for a single unit: callers that take several intervals from one
    Generator rely on each taking exactly ``n_boot * n`` draws."""
    a, b, den = np.asarray(numerator_a), np.asarray(numerator_b), np.asarray(denominator)
    if not (len(a) == len(b) == len(den)):
        raise ValueError(f"paired units differ in number: {len(a)}, {len(b)}, {len(den)}")
    if n_boot < 1:
        return _nan_interval()
    picks = resample(len(a), n_boot, seed)
    return percentile_interval((a[picks].sum(1) - b[picks].sum(1)) / unit / np.maximum(den[picks].sum(1), 1))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho of two equally long 1-d samples (ties: average ranks); NaN for fewer
    than two pairs or a constant side, where rho is undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():
        # A constant side gives NaN, which is the answer here, not something to warn about.
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        return float(sps.spearmanr(x, y).statistic)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each pair of rows of two ``(rows, n)`` arrays, all rows at once:
    the Pearson correlation of the rows' average ranks. NaN for a constant row."""
    rx = sps.rankdata(x, axis=-1)  # (rows, n)
    ry = sps.rankdata(y, axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        return np.asarray(sps.pearsonr(rx, ry, axis=-1).statistic, dtype=float)


def bootstrap_spearman(x: ArrayLike, y: ArrayLike, n_boot: int = 1000, seed: Seed = 0) -> list[float]:
    """95% interval of Spearman's rho over pairs resampled with replacement. A resample in
    which one side is constant has no rho and is left out; NaNs for fewer than three pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or n_boot < 1:
        return _nan_interval()
    picks = resample(len(x), n_boot, seed)
    rho = spearman_rows(x[picks], y[picks])  # (n_boot,)
    return percentile_interval(rho[np.isfinite(rho)])
