"""The metagrad grid: one cell per (game, variant, seed), trained serially or as Ray tasks.

A cell is ``train_variant`` on one game, variant and seed, with its own checkpoint
(``<storage>/<game>/<variant>/seed<k>.pt``) and its own MLflow child run under the stage's run.

Scheduling uses plain Ray tasks rather than Ray Tune: a cell is a fixed-length job with one result,
so Tune's trial API, search and result storage would add nothing, while its experiment restore would
duplicate what the cell checkpoints already do. A task whose worker dies is retried
(``metagrad.ray.max_retries``) and resumes from the cell's checkpoint; a stage run again after a crash
of the driver resumes every cell the same way (finished cells return at once).

Metrics: remote cells never talk to MLflow. They send their metric batches to the driver through a
Ray queue and the driver logs them to the cells' child runs, so the embedded SQLite store, which lives
on the driver's disk, works on a cluster. The serial mode logs to the child runs directly.

A cell's result does not depend on where it runs: the same seed, the same frames and the same number
of torch threads (``cpus_per_cell`` on Ray) give the same bits as its serial run.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import METAGRAD_VARIANTS, MetaConfig, MetagradConfig, MetagradRayConfig
from ..devices import resolve_device
from ..io import atomic_path, torch_load
from ..seeding import variant_seed
from .train import VariantResult, export_model, limit_cpu_threads_for, train_variant

log = logging.getLogger(__name__)

QUEUE_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Cell:
    game: str
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.game}/{self.variant}/seed{self.seed}"

    @property
    def training_seed(self) -> int:
        """The seed ``train_variant`` gets: shared by the variants of one (game, seed)."""
        return variant_seed(self.seed, self.game)

    def path_under(self, folder: Path) -> Path:
        """``<folder>/<game>/<variant>/seed<k>.pt``: the layout of checkpoints and exported agents."""
        return Path(folder) / self.game / self.variant / f"seed{self.seed}.pt"

    def tags(self) -> dict[str, str]:
        return {"game": self.game, "variant": self.variant, "seed": str(self.seed)}


def grid_cells(config: MetagradConfig) -> list[Cell]:
    """Seed-major: a serial grid finishes every variant of a seed before the next seed, so a grid that
    spans several sittings has paired (variant, variant) results early."""
    return [Cell(g, v, s) for g in config.games for s in config.seeds for v in config.variants]


def cell_config(config: MetagradConfig, cell: Cell) -> MetagradConfig:
    """The config of a one-cell grid: what a cell's checkpoint and exported agent record. Adding a
    seed, a game or a variant to the grid, or changing where cells run, keeps other cells' checkpoints.
    A variant that meta-learns nothing ({}) records the meta-learner's defaults: of ``metagrad.meta``
    only the size of the eta embedding reaches its numbers, so a sweep of the meta-learner's settings
    keeps the {} cells' checkpoints."""
    update = {
        "games": [cell.game],
        "variants": [cell.variant],
        "seeds": [cell.seed],
        "ray": MetagradRayConfig(),
    }
    if not METAGRAD_VARIANTS[cell.variant]:
        update["meta"] = MetaConfig(embedding_dim=config.meta.embedding_dim)
    return config.model_copy(update=update)


@dataclass
class CellOutcome:
    cell: Cell
    result: VariantResult
    model: bytes  # the exported agent (export_model's file), shipped to the driver that writes it
    resumed_at_frames: int  # frames the cell's checkpoint held when this (last) attempt started


def checkpoint_frames(path: Path) -> int:
    return int(torch_load(path).get("frames", 0)) if path.exists() else 0


def train_cell(config: MetagradConfig, cell: Cell, checkpoint_root: Path, tracker=None) -> CellOutcome:
    """Train (or resume) one cell and export its agent as bytes."""
    config = cell_config(config, cell)
    checkpoint = cell.path_under(checkpoint_root)
    resumed_at = checkpoint_frames(checkpoint)
    result, learner = train_variant(
        config, cell.game, cell.variant, cell.training_seed, checkpoint, tracker=tracker
    )
    with tempfile.TemporaryDirectory(prefix="metagrad-cell-") as folder:
        model = export_model(learner, result, config, Path(folder) / "agent.pt").read_bytes()
    return CellOutcome(cell, result, model, resumed_at)


# --------------------------------------------------------------------------------------------- driver
def uses_ray(ray_config: MetagradRayConfig) -> bool:
    """Ray runs the cells when more than one runs at a time or when ``RAY_ADDRESS`` names a cluster."""
    return ray_config.concurrent_cells > 1 or bool(os.environ.get("RAY_ADDRESS"))


def run_grid(
    config: MetagradConfig,
    cells: list[Cell],
    checkpoint_root: Path,
    open_cell_run: Callable[[Cell], object],
    on_done: Callable[[CellOutcome, object], None],
) -> list[CellOutcome]:
    """Train every cell; ``open_cell_run(cell)`` gives the context manager of its tracker (a child
    run), ``on_done(outcome, tracker)`` handles a finished cell while its run is still open."""
    schedule = _run_on_ray if uses_ray(config.ray) else _run_serially
    log.info(
        "metagrad grid: %d cells (%s), %s",
        len(cells),
        ", ".join(cell.key for cell in cells),
        f"Ray, {config.ray.concurrent_cells} at a time" if schedule is _run_on_ray else "one after another",
    )
    return schedule(config, cells, Path(checkpoint_root), open_cell_run, on_done)


def _run_serially(config, cells, checkpoint_root, open_cell_run, on_done) -> list[CellOutcome]:
    outcomes = []
    for cell in cells:
        with open_cell_run(cell) as tracker:
            outcome = train_cell(config, cell, checkpoint_root, tracker)
            on_done(outcome, tracker)
        outcomes.append(outcome)
    return outcomes


class QueueTracker:
    """A remote cell's tracker: batches its metrics and puts them on the driver's queue at each flush."""

    def __init__(self, queue, key: str):
        self.queue, self.key, self._queued = queue, key, []

    def queue_metrics(self, metrics, step: int) -> None:
        self._queued.append((dict(metrics), int(step)))  # the driver's child run drops non-finite values

    def flush_metrics(self) -> None:
        if self._queued:
            batch, self._queued = self._queued, []
            self.queue.put((self.key, batch))  # blocks until the queue actor holds it


def _remote_cell(config: MetagradConfig, cell: Cell, checkpoint_root: Path, queue) -> CellOutcome:
    """The body of a cell's Ray task: as many torch threads as the cell has CPUs, then train it."""
    from ..stage import configure_logging

    configure_logging()  # the cell's progress lines reach the driver's log (Ray's log_to_driver)
    log.info("%s: running on %s (pid %d)", cell.key, socket.gethostname(), os.getpid())
    torch.set_num_threads(config.ray.cpus_per_cell)
    limit_cpu_threads_for(resolve_device(config.device, "metagrad.device"))
    return train_cell(config, cell, checkpoint_root, QueueTracker(queue, cell.key))


@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[object]:
    """Join the cluster ``RAY_ADDRESS`` names, else start a local Ray; shut down what we started."""
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _run_on_ray(config, cells, checkpoint_root, open_cell_run, on_done) -> list[CellOutcome]:
    ray_config = config.ray
    local_cpus = ray_config.concurrent_cells * ray_config.cpus_per_cell
    with ray_session(local_cpus) as ray:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # takes no CPU from the cells
        task = ray.remote(_remote_cell)
        resources = {
            "num_cpus": ray_config.cpus_per_cell,
            "num_gpus": ray_config.gpus_per_cell,
            "max_retries": ray_config.max_retries,
        }
        runs: dict[str, tuple[ExitStack, object]] = {}  # open child runs of the cells in flight
        pending: dict[object, Cell] = {}
        todo, outcomes = list(cells), []
        try:
            while todo or pending:
                while todo and len(pending) < ray_config.concurrent_cells:
                    cell = todo.pop(0)
                    stack = ExitStack()
                    runs[cell.key] = (stack, stack.enter_context(open_cell_run(cell)))
                    # the task's name is its worker's process title: ray::metagrad_cell <cell>
                    named = task.options(name=f"metagrad_cell {cell.key}", **resources)
                    pending[named.remote(config, cell, checkpoint_root, queue)] = cell
                done, _ = ray.wait(list(pending), num_returns=1, timeout=QUEUE_POLL_SECONDS)
                _log_queued(queue, runs)  # a cell's last batch arrives before its result
                for ref in done:
                    outcome = ray.get(ref)
                    cell = pending.pop(ref)
                    stack, tracker = runs.pop(cell.key)
                    with stack:
                        on_done(outcome, tracker)
                    outcomes.append(outcome)
        except BaseException as error:
            for stack, _ in runs.values():  # the cells still running end as failed runs
                stack.__exit__(type(error), error, error.__traceback__)
            raise
        return outcomes


def _log_queued(queue, runs: dict[str, tuple[ExitStack, object]]) -> None:
    """Log every metric batch the remote cells have sent so far to their child runs."""
    while not queue.empty():
        for key, batch in queue.get_nowait_batch(queue.qsize()):
            tracker = runs[key][1]
            for metrics, step in batch:
                tracker.queue_metrics(metrics, step)
            tracker.flush_metrics()


def write_model(outcome: CellOutcome, models_dir: Path) -> Path:
    target = outcome.cell.path_under(models_dir)
    with atomic_path(target) as tmp:
        tmp.write_bytes(outcome.model)
    return target
