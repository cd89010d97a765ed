"""Sample efficiency of a metagrad cell from its training history: when it reached a return, when its
meta-learned gamma and lambda settled.

Both read ``History`` (the curves a cell's checkpoint and the stage's CSVs hold), so they work on a
finished grid and on one that is still running (``python -m pipeline curves``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .train import History

WINDOW_FRAMES = 1_000_000  # "the first million-frame window whose mean training return passes it"
RETURN_THRESHOLDS = (10.0, 18.0)  # Pong: the +10 and +18 marks of the seeds comparison


def frames_to_reach(
    episode_frames: Sequence[int],
    episode_returns: Sequence[float],
    threshold: float,
    window_frames: int = WINDOW_FRAMES,
) -> int | None:
    """The end frame of the first window ``(k W, (k + 1) W]`` whose finished episodes' mean return is
    at least ``threshold``; None if no window gets there.

    An episode belongs to the window of the frame count at which it ended: that count is taken after
    the step that ended it, so the window closes on its right (a game ending on the last step of a
    10 M-frame run, at frame 10 000 000, is in (9 M, 10 M], not alone in a window of its own). Windows
    without a finished episode are skipped (they have no mean). The last window may be partial: a run
    of 9.5 M frames has a window (9 M, 10 M] with half a window of episodes, reported as 10 M.
    """
    for window, mean in enumerate(window_means(episode_frames, episode_returns, window_frames)):
        if mean is not None and mean >= threshold:
            return (window + 1) * window_frames
    return None


def window_means(
    episode_frames: Sequence[int], episode_returns: Sequence[float], window_frames: int = WINDOW_FRAMES
) -> list[float | None]:
    """Mean return of the episodes that ended in each window ``(k W, (k + 1) W]``, k = 0 up to the
    last window with an episode; None for a window in which no episode ended. The windows of
    ``frames_to_reach``: a cell's learning curve at the resolution its milestones are read at."""
    if len(episode_frames) != len(episode_returns):
        raise ValueError(
            f"episode_frames ({len(episode_frames)}) and episode_returns ({len(episode_returns)}) "
            "differ in length"
        )
    if window_frames <= 0:
        raise ValueError(f"window_frames must be positive, got {window_frames}")
    sums: dict[int, list[float]] = {}
    for frame, value in zip(episode_frames, episode_returns, strict=True):
        total = sums.setdefault((frame - 1) // window_frames, [0.0, 0])
        total[0] += value
        total[1] += 1
    last = max(sums, default=-1)
    return [sums[k][0] / sums[k][1] if k in sums else None for k in range(last + 1)]


def settle_frame(
    update_frames: Sequence[int],
    values: Sequence[float],
    relative_band: float = 0.05,
    absolute_band: float = 1e-5,
) -> int | None:
    """The first update frame after which the value stays within a band around its final value.

    band = max(``absolute_band``, ``relative_band`` × (max − min of the values over the run)): a
    parameter that moved far settles when it stays within 5 % of its travel of where it ended; one that
    hardly moved (the {} baseline's fixed gamma) settles at its first update. None for an empty history.
    The absolute floor is only float noise: a meta-learned gamma near 0.99 may travel ~1e-3 in total,
    and that is a 10 % change of its horizon 1 / (1 - gamma), so a coarser floor would call it settled
    at once. A value that settles in the last few updates is still moving when the run ends.
    """
    if len(update_frames) != len(values):
        raise ValueError(f"update_frames ({len(update_frames)}) and values ({len(values)}) differ in length")
    if not values:
        return None
    final = values[-1]
    band = max(absolute_band, relative_band * (max(values) - min(values)))
    settled_from = len(values) - 1
    while settled_from > 0 and abs(values[settled_from - 1] - final) <= band:
        settled_from -= 1
    return int(update_frames[settled_from])


@dataclass(frozen=True)
class CellMilestones:
    """When one cell reached each return threshold and when its gamma and lambda settled (frames)."""

    frames: int
    frames_to_return: dict[str, int | None]  # threshold (as text, e.g. "10") -> frames, None: not reached
    gamma_final: float | None
    gamma_settled_at: int | None
    lambda_final: float | None
    lambda_settled_at: int | None
    return_per_million_frames: list[float | None]  # window_means: the training curve, window by window

    def to_dict(self) -> dict:
        return asdict(self)


def cell_milestones(history: History, thresholds: Sequence[float] = RETURN_THRESHOLDS) -> CellMilestones:
    return CellMilestones(
        frames=int(history.update_frames[-1]) if history.update_frames else 0,
        frames_to_return={
            f"{threshold:g}": frames_to_reach(history.episode_frames, history.episode_returns, threshold)
            for threshold in thresholds
        },
        gamma_final=history.gammas[-1] if history.gammas else None,
        gamma_settled_at=settle_frame(history.update_frames, history.gammas),
        lambda_final=history.lambdas[-1] if history.lambdas else None,
        lambda_settled_at=settle_frame(history.update_frames, history.lambdas),
        return_per_million_frames=window_means(history.episode_frames, history.episode_returns),
    )


@dataclass(frozen=True)
class CollapseEvent:
    """A stretch of updates whose policy was near uniform: ``start``/``end`` are update frames."""

    start: int
    end: int
    peak: float  # the highest rolling-mean entropy in it, in nats


def collapse_events(
    update_frames: Sequence[int],
    entropies: Sequence[float],
    max_entropy: float,
    fraction: float = 0.97,
    window: int = 5,
    merge_frames: int = 20_000,
) -> list[CollapseEvent]:
    """Stretches after the policy first left uniform play in which it went back to near uniform.

    An update is collapsed when the mean policy entropy of its last ``window`` updates (itself included)
    is at least ``fraction`` × ``max_entropy`` (ln of the number of actions: the uniform policy's
    entropy). A fresh policy starts there, so the collapsed updates before the first one below the
    threshold are not events. Consecutive collapsed updates form an event, and so do collapsed updates
    at most ``merge_frames`` apart. A policy that keeps learning can pass through such events and
    recover; an agent exported in or just after one plays near-randomly (``frames_since_collapse``).
    """
    if len(update_frames) != len(entropies):
        raise ValueError(
            f"update_frames ({len(update_frames)}) and entropies ({len(entropies)}) differ in length"
        )
    if window < 1:
        raise ValueError(f"window must be at least 1 update, got {window}")
    if not 0.0 < fraction <= 1.0 or max_entropy <= 0.0 or merge_frames < 0:
        raise ValueError(
            "need 0 < fraction <= 1, max_entropy > 0 and merge_frames >= 0, "
            f"got {fraction}, {max_entropy} and {merge_frames}"
        )
    threshold = fraction * max_entropy
    events: list[CollapseEvent] = []
    left_uniform = False
    last_collapsed = -2  # index of the latest collapsed update counted in an event
    for i, frame in enumerate(update_frames):
        recent = entropies[max(0, i - window + 1) : i + 1]
        mean = sum(recent) / len(recent)
        if mean < threshold:
            left_uniform = True
            continue
        if not left_uniform:
            continue
        if events and (last_collapsed == i - 1 or frame - events[-1].end <= merge_frames):
            events[-1] = CollapseEvent(events[-1].start, int(frame), max(events[-1].peak, mean))
        else:
            events.append(CollapseEvent(int(frame), int(frame), mean))
        last_collapsed = i
    return events


def frames_since_collapse(events: Sequence[CollapseEvent], update_frames: Sequence[int]) -> int | None:
    """Frames from the end of the last event to the last update (the one an exported agent comes
    from): 0 when the run ended inside one, None without events. The entropy of an update is that of
    the policy which collected its batch, before the update, so a small count means the exported agent
    is the policy of a collapse or one update after it."""
    if not events or not update_frames:
        return None
    return int(update_frames[-1]) - events[-1].end
