"""Frames to reach a return and the settling frame of gamma/lambda, against numbers worked out by hand."""

import random

import pytest

from pipeline.metagrad.milestones import (
    CollapseEvent,
    cell_milestones,
    collapse_events,
    frames_since_collapse,
    frames_to_reach,
    settle_frame,
    window_means,
)
from pipeline.metagrad.run import csv_histories, write_cell_curves
from pipeline.metagrad.train import History


def test_frames_to_reach_is_the_end_of_the_first_window_whose_mean_passes():
    frames = [100, 900, 1_100, 1_500, 1_900, 2_500]
    returns = [-21.0, 0.0, 9.0, 12.0, 10.0, 20.0]
    # windows of 1 000 frames: [0, 1000) mean -10.5; [1000, 2000) mean 31/3 = 10.33; [2000, 3000) mean 20
    assert frames_to_reach(frames, returns, 10.0, window_frames=1_000) == 2_000
    assert frames_to_reach(frames, returns, 10.5, window_frames=1_000) == 3_000
    assert frames_to_reach(frames, returns, -10.5, window_frames=1_000) == 1_000  # "passes" includes equal
    assert frames_to_reach(frames, returns, 20.5, window_frames=1_000) is None
    assert frames_to_reach([], [], 0.0) is None


def test_an_episode_ending_on_a_window_boundary_belongs_to_the_window_it_closes():
    # frame counts are taken after the step: a game ending at frame 2 000 ended inside (1000, 2000]
    frames, returns = [1_500, 2_000], [0.0, 20.0]
    assert frames_to_reach(frames, returns, 10.0, window_frames=1_000) == 2_000  # mean of both, 10
    assert frames_to_reach(frames, returns, 18.0, window_frames=1_000) is None  # no lone 1-game window


def test_frames_to_reach_skips_windows_without_episodes():
    # no episode ends in [1000, 2000): the next window with episodes decides
    assert frames_to_reach([500, 2_500], [-5.0, 15.0], 10.0, window_frames=1_000) == 3_000


def test_frames_to_reach_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        frames_to_reach([1, 2], [1.0], 0.0)
    with pytest.raises(ValueError, match="window_frames must be positive"):
        frames_to_reach([1], [1.0], 0.0, window_frames=0)


def test_settle_frame_is_where_the_value_enters_its_final_band_for_good():
    frames = [10, 20, 30, 40, 50, 60]
    values = [0.99, 0.95, 0.90, 0.905, 0.899, 0.90]
    # travel 0.09 -> band max(1e-5, 0.05 * 0.09 = 0.0045); final 0.90: 0.905 is out (0.005), 0.899 in
    assert settle_frame(frames, values) == 50
    assert settle_frame(frames, values, relative_band=0.1) == 30  # band 0.009: 0.90, 0.905 in; 0.95 out
    assert settle_frame([10, 20], [0.99, 0.99]) == 10  # a fixed parameter settles at once
    # a meta-learned gamma that travels only 1.2e-3 (band 6e-5) is still drifting, not settled at once
    drifting = [0.9900, 0.9895, 0.9890, 0.98885, 0.98882, 0.9888]
    assert settle_frame(frames, drifting) == 40  # a 1e-3 floor would say 20
    assert settle_frame([], []) is None
    with pytest.raises(ValueError, match="differ in length"):
        settle_frame([1], [])


def test_cell_milestones_collects_both():
    history = History(
        episode_frames=[400_000, 1_600_000, 1_700_000],
        episode_returns=[-20.0, 12.0, 19.0],
        update_frames=[1_000, 2_000, 3_000],
        gammas=[0.99, 0.98, 0.98],
        lambdas=[0.99, 0.99, 0.99],
    )
    m = cell_milestones(history)
    assert m.frames == 3_000
    assert m.frames_to_return == {"10": 2_000_000, "18": None}  # window [1 M, 2 M) has mean 15.5
    assert (m.gamma_final, m.gamma_settled_at) == (0.98, 2_000)
    assert (m.lambda_final, m.lambda_settled_at) == (0.99, 1_000)
    assert m.to_dict()["frames_to_return"]["10"] == 2_000_000


def slow_window_means(frames, returns, window):
    """The obvious loop: for each window (k W, (k + 1) W], the mean of the games that ended in it."""
    last = max(((f - 1) // window for f in frames), default=-1)
    means = []
    for k in range(last + 1):
        inside = [r for f, r in zip(frames, returns, strict=True) if k * window < f <= (k + 1) * window]
        means.append(sum(inside) / len(inside) if inside else None)
    return means


def test_window_means_against_the_obvious_loop_and_by_hand():
    assert window_means([100, 900, 2_500, 2_900], [-21.0, 0.0, 9.0, 12.0], 1_000) == [-10.5, None, 10.5]
    assert window_means([1_000, 1_001], [1.0, 3.0], 1_000) == [1.0, 3.0]  # 1 000 closes (0, 1 000]
    assert window_means([], []) == []
    rng = random.Random(0)
    for _ in range(50):
        frames = sorted(rng.randrange(1, 20_000) for _ in range(rng.randrange(0, 40)))
        returns = [float(rng.randrange(-21, 22)) for _ in frames]
        assert window_means(frames, returns, 1_000) == pytest.approx(
            slow_window_means(frames, returns, 1_000)
        )
    with pytest.raises(ValueError, match="differ in length"):
        window_means([1], [])


def test_cell_milestones_hold_the_training_curve_per_million_frames():
    history = History(episode_frames=[400_000, 2_600_000], episode_returns=[-20.0, 5.0])
    assert cell_milestones(history).return_per_million_frames == [-20.0, None, 5.0]


def test_csv_histories_read_back_what_write_cell_curves_wrote(tmp_path):
    """The evaluate stage reads the cells back from the metagrad stage's CSVs: exactly, every variant
    (gamma_lambda ends in "_lambda" too), and nothing from files that are not a cell's pair."""
    cells = {
        ("pong", "impala", 0): History([4, 8], [-21.0, -20.0], [2, 4, 6], [0.99] * 3, [1.0] * 3),
        ("pong", "gamma_lambda", 2): History([5], [-19.5], [3, 6], [0.99, 0.9871234567], [1.0, 0.9612]),
        ("space_invaders", "lambda", 1): History([], [], [1], [0.99], [0.95]),
    }
    for (game, variant, seed), h in cells.items():
        write_cell_curves(h, tmp_path, f"{game}_{variant}_seed{seed}")
    (tmp_path / "returns_pong_impala_seed7.csv").write_text("frames,episode_return\n")  # no eta file
    (tmp_path / "returns_pong.png").write_bytes(b"")
    histories = csv_histories(tmp_path)
    assert {(g, v, s) for g, vs in histories.items() for v, ss in vs.items() for s in ss} == set(cells)
    for (game, variant, seed), h in cells.items():
        assert histories[game][variant][seed] == h


def test_collapse_events_by_hand():
    frames = [100 * (i + 1) for i in range(12)]
    # uniform at the start (not an event), learns, collapses twice, recovers, ends collapsed
    entropy = [1.0, 1.0, 0.2, 0.2, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 1.0]
    events = collapse_events(frames, entropy, max_entropy=1.0, fraction=0.9, window=1, merge_frames=0)
    assert events == [CollapseEvent(500, 600, 1.0), CollapseEvent(1_200, 1_200, 1.0)]
    assert frames_since_collapse(events, frames) == 0  # ended inside one
    # merge_frames joins the two: 1 200 - 600 = 600 frames apart
    merged = collapse_events(frames, entropy, max_entropy=1.0, fraction=0.9, window=1, merge_frames=600)
    assert merged == [CollapseEvent(500, 1_200, 1.0)]
    # a 2-update rolling mean: (1 + 0.2) / 2 = 0.6 < 0.9, so only the second of each pair is collapsed
    rolled = collapse_events(frames, entropy, max_entropy=1.0, fraction=0.9, window=2, merge_frames=0)
    assert rolled == [CollapseEvent(600, 600, 1.0)]
    assert frames_since_collapse(rolled, frames) == 600
    assert frames_since_collapse([], frames) is None
    assert collapse_events([], [], max_entropy=1.0) == []


def slow_collapse_events(frames, entropy, max_entropy, fraction, window, merge_frames):
    collapsed = []
    for i in range(len(frames)):
        recent = entropy[max(0, i - window + 1) : i + 1]
        collapsed.append(sum(recent) / len(recent) >= fraction * max_entropy)
    first_below = next((i for i, c in enumerate(collapsed) if not c), len(frames))
    indices = [i for i in range(first_below, len(frames)) if collapsed[i]]
    groups = []
    for i in indices:
        if groups and (i == groups[-1][-1] + 1 or frames[i] - frames[groups[-1][-1]] <= merge_frames):
            groups[-1].append(i)
        else:
            groups.append([i])
    means = [
        sum(entropy[max(0, i - window + 1) : i + 1]) / len(entropy[max(0, i - window + 1) : i + 1])
        for i in range(len(frames))
    ]
    return [(frames[g[0]], frames[g[-1]], max(means[i] for i in g)) for g in groups]


@pytest.mark.parametrize("seed", range(5))
def test_collapse_events_against_the_obvious_loop(seed):
    rng = random.Random(seed)
    frames = sorted(rng.sample(range(1, 50_000), 300))
    entropy = [rng.choice([1.79, 1.75, 1.2, 0.8]) for _ in frames]
    window, merge = rng.choice([1, 3, 5]), rng.choice([0, 500, 5_000])
    events = collapse_events(
        frames, entropy, max_entropy=1.7918, fraction=0.95, window=window, merge_frames=merge
    )
    expected = slow_collapse_events(frames, entropy, 1.7918, 0.95, window, merge)
    assert [(e.start, e.end) for e in events] == [(s, e) for s, e, _ in expected]
    assert [e.peak for e in events] == pytest.approx([p for _, _, p in expected])


def test_collapse_events_refuses_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        collapse_events([1, 2], [1.0], max_entropy=1.0)
    with pytest.raises(ValueError, match="window"):
        collapse_events([1], [1.0], max_entropy=1.0, window=0)
    with pytest.raises(ValueError, match="fraction"):
        collapse_events([1], [1.0], max_entropy=1.0, fraction=1.5)
