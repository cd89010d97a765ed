"""Seed bands and multi-panel figures of ``pipeline/plots.py``."""

import pytest

from pipeline.plots import BandPanel, band_panels, seed_band


def test_seed_band_over_curves_with_their_own_frames():
    x, mean, low, high = seed_band([([0, 10], [0.0, 10.0]), ([0, 5, 10], [2.0, 2.0, 2.0])], points=3)
    assert x == [0.0, 5.0, 10.0]
    assert mean == [1.0, 3.5, 6.0] and low == [0.0, 2.0, 2.0] and high == [2.0, 5.0, 10.0]
    assert seed_band([([1, 2], [3.0, 4.0])]) == ([1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [3.0, 4.0])


def test_band_panels_draws_one_panel_per_quantity_and_rejects_none(tmp_path):
    two_seeds = {"{}": [([0, 10], [0.0, 1.0]), ([0, 10], [2.0, 3.0])]}
    path = band_panels(
        tmp_path / "t.png",
        [BandPanel(two_seeds, "return", {"random": -20.7}), BandPanel(two_seeds, "gamma")],
        xlabel="frames",
        title="t",
    )
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="no panels"):
        band_panels(tmp_path / "u.png", [], xlabel="frames", title="u")
    assert not (tmp_path / "u.png").exists()
