"""Static PNG plots (matplotlib, headless). DVC's HTML plots need a CDN an offline user lacks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path  # noqa: E402


def _save(figure, target: Path) -> Path:
    with atomic_path(target, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)
    return Path(target)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_plot(
    target: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    reference_lines: Mapping[str, float] | None = None,
) -> Path:
    """One line per series; optional shaded bands (low, high) per series and horizontal references."""
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    _draw_lines(axis, series, bands, reference_lines)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    return _save(figure, target)


def _draw_lines(axis, series, bands=None, reference_lines=None) -> None:
    for label, (x, y) in series.items():
        (line,) = axis.plot(x, y, label=label)
        if bands and label in bands:
            low, high = bands[label]
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for label, level in (reference_lines or {}).items():
        axis.axhline(level, linestyle="--", color="grey", linewidth=1)
        axis.annotate(label, (0.01, level), xycoords=("axes fraction", "data"), fontsize=8, color="grey")
    axis.grid(alpha=0.3)
    if series:
        axis.legend(fontsize=8)


def bar_plot(
    target: Path,
    groups: Mapping[str, Mapping[str, float]],
    *,
    ylabel: str,
    title: str,
    errors: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bars: ``groups[group][bar] = value``; ``errors[group][bar] = (low, high)``."""
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    group_names = list(groups)
    bar_names = sorted({bar for values in groups.values() for bar in values}, key=str)
    width = 0.8 / max(1, len(bar_names))
    for j, bar in enumerate(bar_names):
        xs, heights, yerr = [], [], [[], []]
        for i, group in enumerate(group_names):
            if bar not in groups[group]:
                continue
            value = groups[group][bar]
            xs.append(i + (j - (len(bar_names) - 1) / 2) * width)
            heights.append(value)
            low, high = (errors or {}).get(group, {}).get(bar, (value, value))
            yerr[0].append(max(0.0, value - low))
            yerr[1].append(max(0.0, high - value))
        axis.bar(xs, heights, width=width, label=bar, yerr=yerr if errors else None, capsize=3)
    axis.set_xticks(range(len(group_names)))
    axis.set_xticklabels(group_names)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return _save(figure, target)


def seed_band(
    curves: list[tuple[list[float], list[float]]], points: int = 200
) -> tuple[list, list, list, list]:
    """Mean and min-max band over seeds of curves with their own x values: (x, mean, low, high).

    The curves are interpolated onto a common grid over the x range they all cover; one curve is
    returned as it is (its band is the line itself).
    """
    arrays = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not arrays:
        return [], [], [], []
    if len(arrays) == 1:
        x, y = arrays[0]
        return x.tolist(), y.tolist(), y.tolist(), y.tolist()
    start, end = max(x[0] for x, _ in arrays), min(x[-1] for x, _ in arrays)
    if start > end:  # no common range: cover all of them, np.interp holds the end values
        start, end = min(x[0] for x, _ in arrays), max(x[-1] for x, _ in arrays)
    grid = np.linspace(start, end, points) if end > start else np.array([start])
    ys = np.stack([np.interp(grid, x, y) for x, y in arrays])
    return grid.tolist(), ys.mean(0).tolist(), ys.min(0).tolist(), ys.max(0).tolist()


def band_plot(target: Path, curves: dict[str, list[tuple[list, list]]], **labels) -> Path:
    """One line per label (the mean over seeds) with a min-max band where there are several seeds."""
    series, bands = _seed_series(curves)
    return line_plot(target, series, bands=bands or None, **labels)


def band_panels(target: Path, panels: Sequence[BandPanel], *, xlabel: str, title: str) -> Path:
    """Side-by-side ``band_plot`` panels sharing the x axis (e.g. return, gamma and lambda vs frames)."""
    if not panels:
        raise ValueError(f"band_panels: no panels to draw into {target}")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        series, bands = _seed_series(panel.curves)
        _draw_lines(axis, series, bands, panel.reference_lines)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(panel.ylabel)
    figure.suptitle(title)
    return _save(figure, target)


@dataclass(frozen=True)
class BandPanel:
    """One panel of ``band_panels``: ``curves[label]`` = [(x, y) per seed]."""

    curves: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]]
    ylabel: str
    reference_lines: Mapping[str, float] | None = None


def _seed_series(curves) -> tuple[dict, dict]:
    """Mean line per label, and a min-max band for the labels with several seeds."""
    series, bands = {}, {}
    for label, per_seed in curves.items():
        x, mean, low, high = seed_band(list(per_seed))
        series[label] = (x, mean)
        if len(per_seed) > 1:
            bands[label] = (low, high)
    return series, bands
