"""Small, exact statistics for the evaluation: confidence intervals and human-normalised scores."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from statistics import median
from typing import NamedTuple

from scipy import stats


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval, mean +- t_{n-1,(1+c)/2} * s / sqrt(n), over finite values
    (``scipy.stats.t.interval`` with the standard error of the mean, s the n - 1 standard deviation).

    With one value, or equal values, the interval is the point itself; with none everything is nan.
    """
    finite = [float(v) for v in values if math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(finite) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sem = float(stats.sem(finite))
    if sem == 0.0:  # equal values: scipy rejects a zero scale, the interval is the point itself
        return Interval(mean, mean, mean, n)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def human_normalized(score: float, random: float, human: float) -> float:
    """(agent - random) / (human - random): 0 is a random agent, 1 a professional human tester."""
    if human == random:
        raise ValueError(f"human and random scores are equal ({human}); the normalisation is undefined")
    return (score - random) / (human - random)


def aggregate_hns(per_game: Mapping[str, float]) -> dict[str, float]:
    """Median and mean human-normalised score over games."""
    values = [v for v in per_game.values() if math.isfinite(v)]
    if not values:
        return {"median": math.nan, "mean": math.nan, "games": 0}
    return {"median": float(median(values)), "mean": float(sum(values) / len(values)), "games": len(values)}
