"""The shared entry point of the stage scripts in ``stages/``.

``stage_main`` parses ``--params``, validates the whole params file before any work (exit status 2,
one line per bad key, nothing written), checks what the stage needs from outside (``preflight``: the
tracking store, registry URIs, Ray), configures logging and threads, and opens the stage's MLflow
run. Stage scripts then only call one library function and name their output paths. A ``StageStop``
(the tracking store gone for too long, a missing service) ends the stage with one line on stderr and
its exit status, the work so far kept in the stage's checkpoints.

Long stages resume: ``resumable_stage_run`` continues the MLflow run a killed invocation left behind,
``Checkpointer`` saves and restores a training loop's state (with every RNG), and SIGTERM / SIGINT make
the loop checkpoint at its next safe point, end the run as KILLED and exit with 128 + the signal.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import ConfigError, PipelineConfig, load_params, params_hash, section_dict
from .errors import StageStop
from .io import read_json, torch_load, torch_save, write_json
from .preflight import preflight

log = logging.getLogger("pipeline")

EXIT_BAD_PARAMS = 2


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MLflow and alembic are chatty at INFO about database migrations.
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.system_metrics", "evotorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(stage: str, argv: list[str] | None = None) -> tuple[PipelineConfig, Path]:
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--output-root",
        default=".",
        type=Path,
        help="folder under which data/, models/, metrics/, plots/, reports/ and checkpoints/ are read and "
        "written (default: the project root, as DVC expects; another folder keeps a side run apart)",
    )
    args = parser.parse_args(argv)
    try:
        return load_params(Path(args.params)), args.output_root
    except ConfigError as err:
        print(f"{stage}: invalid params, nothing was run or written:", file=sys.stderr)
        for line in err.lines:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS) from None


def stage_main(
    stage: str, body: Callable[[PipelineConfig, Path], object], argv: list[str] | None = None
) -> None:
    """Validate params and preflight, then run ``body(config, output_root)``; bad params exit 2 before
    any work, a ``StageStop`` exits with its status and one line on stderr."""
    configure_logging()
    config, output_root = parse_args(stage, argv)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    section = section_dict(config, stage)
    log.info("%s: params hash %s", stage, params_hash(section))
    try:
        preflight(section)
        with stopping_on_signals():
            body(config, output_root)
    except StageStop as err:
        print(f"{stage}: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


RUN_STATE_FILE = "run.json"


def resumable_run_id(checkpoint_dir: Path, section_hash: str) -> str | None:
    """The MLflow run id a killed stage left behind, if its params are the ones we run with now."""
    from .tracking import run_status

    state_file = Path(checkpoint_dir) / RUN_STATE_FILE
    if not state_file.exists():
        return None
    state = read_json(state_file)
    if state.get("params_hash") != section_hash:
        log.info("checkpoints in %s are for other params; starting over", checkpoint_dir)
        return None
    run_id = state.get("mlflow_run_id")
    if run_id and run_status(run_id) == "FINISHED":
        # A finished run registered its outputs; reopening it would rewrite (or fail) its record.
        log.info("MLflow run %s of %s finished; this invocation records a new run", run_id, checkpoint_dir)
        return None
    return run_id


def remember_run(checkpoint_dir: Path, section_hash: str, run_id: str) -> None:
    write_json(Path(checkpoint_dir) / RUN_STATE_FILE, {"params_hash": section_hash, "mlflow_run_id": run_id})


# The sources (under pipeline/) whose code decides a checkpointing stage's numbers. A checkpoint is resumed
# only by the same sources: a change elsewhere (reports, the CLI, another method, orchestration) keeps a
# long run's checkpoints, so a 10 M-frame cell survives unrelated commits between sittings.
STAGE_SOURCES = {
    "evolve": ("epg", "rl", "envs/tasks.py", "envs/batched.py", "envs/hopper.py", "seeding.py"),
    "maml": ("maml", "rl", "envs/tasks.py", "envs/batched.py", "envs/hopper.py", "seeding.py"),
    "metagrad": (
        "metagrad/learner.py",
        "metagrad/optim.py",
        "metagrad/train.py",
        "rl",
        "nets",
        "envs/atari.py",
        "seeding.py",
    ),
}


def code_fingerprint(stage: str, package: Path | None = None) -> str:
    """Hash of the sources that decide ``stage``'s numbers (``STAGE_SOURCES``) in ``package`` (default:
    this package)."""
    if stage not in STAGE_SOURCES:
        raise ValueError(
            f"no source list for stage {stage!r}; stages that checkpoint: {', '.join(STAGE_SOURCES)}"
        )
    package = package or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in STAGE_SOURCES[stage]:
        path = package / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(package).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_key(stage: str, section_hash: str) -> str:
    """What a checkpoint must match to be resumed: the stage's params and the code of its computation."""
    return f"{section_hash}-{code_fingerprint(stage)}"


@contextmanager
def resumable_stage_run(
    stage: str, config: PipelineConfig, checkpoint_dir: Path
) -> Iterator[tuple[object, str]]:
    """The MLflow run of a checkpointing stage: continues the run a killed invocation left behind (same
    params and code), else starts one. Yields (run, resume_key); checkpoints must carry resume_key."""
    from .tracking import StageRun

    section = section_dict(config, stage)
    section_hash = params_hash(section)
    resume_key = checkpoint_key(stage, section_hash)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with StageRun(
        stage,
        section,
        section_hash,
        experiment=config.tracking.experiment,
        resume_run_id=resumable_run_id(checkpoint_dir, resume_key),
        system_metrics=config.tracking.system_metrics,
    ) as run:
        remember_run(checkpoint_dir, resume_key, run.run_id)
        yield run, resume_key


# ------------------------------------------------------------------------------------- stopping on signals
class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the stage. A KeyboardInterrupt, so that the stage's MLflow run ends as
    KILLED and no ``except Exception`` on the way swallows it; ``stage_main`` exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _StopSignals:
    """Where a stop signal goes: inside a training loop (``deferring``) it waits for the loop's next
    checkpoint; anywhere else it stops the stage at once."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferring = 0

    def handle(self, signum: int, frame) -> None:
        if self.deferring and self.pending is None:
            self.pending = signum
            log.warning(
                "%s: checkpointing at the next safe point, then stopping", signal.Signals(signum).name
            )
            return
        raise StopRequested(signum)  # outside a loop, or a second signal: stop now


_STOP = _StopSignals()  # signal handlers are per process; so is this record of a pending signal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Run a stage body: SIGTERM and SIGINT stop it (a training loop first checkpoints) and the process
    exits with status 128 + signum, as a process killed by the signal would; a later run resumes."""
    previous = {signum: signal.signal(signum, _STOP.handle) for signum in STOP_SIGNALS}
    try:
        yield
    except StopRequested as stop:
        log.warning("%s; a later run resumes from the last checkpoint", stop)
        raise SystemExit(128 + stop.signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _STOP.pending = None


# ------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """The global RNG states a training loop draws from: torch (CPU and every CUDA device), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # e.g. actions sampled on the GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """The checkpoint of one resumable loop: ``restore()`` before it, ``safe_point``/``save`` in it.

    * Written atomically beside ``path`` and renamed over it; the checkpoint it replaces is kept as
      ``<stem>.previous<suffix>``, so a kill at any moment leaves at least one complete checkpoint.
    * Keyed: only a checkpoint with the same ``key`` (params hash and code fingerprint) is resumed.
    * The global RNG states (torch CPU and CUDA, numpy, Python) are saved and restored with the state.
    * An unreadable checkpoint is moved aside to ``<name>.corrupt-<time>`` with a one-line warning
      naming it; the previous checkpoint is tried next, else the loop starts over.

    The file holds the loop's state dict at the top level (tools read e.g. its ``history``) plus the
    reserved entries ``checkpoint_key`` and ``rng_state``.
    """

    KEY, RNG = "checkpoint_key", "rng_state"

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key
        self.previous = self.path.with_name(f"{self.path.stem}.previous{self.path.suffix}")

    def restore(self) -> dict | None:
        """The saved state (the RNGs already restored), or None: start over."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write cut by kill -9
            stale.unlink()
        for path in (self.path, self.previous):
            checkpoint = self._read(path)
            if checkpoint is None:
                continue
            if checkpoint[self.KEY] != self.key:
                log.info("%s is for other params or code; starting over", path)
                return None
            set_rng_state(checkpoint.pop(self.RNG))
            del checkpoint[self.KEY]
            if path == self.previous:
                log.warning("resuming from the previous checkpoint %s", path)
            return checkpoint
        return None

    def _read(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            checkpoint = torch_load(path)
            if not isinstance(checkpoint, dict):
                raise ValueError(f"holds a {type(checkpoint).__name__}, not a checkpoint")
        except Exception as err:  # truncated, overwritten, foreign: never block the stage for good
            reason = str(err).splitlines()[0] if str(err) else ""
            self._move_aside(path, f"unreadable: {type(err).__name__}: {reason}")
            return None
        if not {self.KEY, self.RNG} <= checkpoint.keys():  # written by an older version of the code
            return {self.KEY: None}
        return checkpoint

    def _move_aside(self, path: Path, reason: str) -> Path:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        log.warning("checkpoint %s (%s) moved aside to %s", path, reason, aside.name)
        return aside

    def discard(self, reason: str = "cannot be resumed") -> None:
        """Move the latest and the previous checkpoint aside (kept for inspection): start over."""
        for path in (self.path, self.previous):
            if path.exists():
                self._move_aside(path, reason)

    def save(self, state: dict) -> None:
        torch_save(self.path, {**state, self.KEY: self.key, self.RNG: rng_state()}, previous=self.previous)

    @contextmanager
    def deferring_stop(self) -> Iterator[None]:
        """Within: SIGTERM / SIGINT wait for the next ``safe_point`` (which checkpoints, then stops)."""
        _STOP.deferring += 1
        try:
            yield
        finally:
            _STOP.deferring -= 1
        if _STOP.pending is not None and not _STOP.deferring:  # arrived after the loop's last safe point
            raise StopRequested(_STOP.pending)

    def safe_point(self, state: Callable[[], dict], due: bool) -> None:
        """Save ``state()`` when ``due`` or when a stop signal is pending; then stop on that signal."""
        stop = _STOP.pending
        if due or stop is not None:
            self.save(state())
        if stop is not None:
            raise StopRequested(stop)


def loop_progress(desc: str, unit: str, start: int, total: int) -> tqdm:
    """The progress bar of a resumable loop over ``range(start, total)``: it starts at ``start`` of
    ``total`` (the steps a checkpoint already did count as done); off when stderr is not a terminal."""
    return tqdm(range(start, total), desc=desc, unit=unit, initial=start, total=total, disable=None)
