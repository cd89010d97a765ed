"""MLflow tracking: the library's only door to MLflow (``registry`` builds on it for the Model Registry).

Default store: a SQLite file (``mlflow.db``) and an artifact folder (``mlartifacts/``) in the project
root, addressed by absolute paths, so no server is needed. ``MLFLOW_TRACKING_URI`` points everything
at a server instead.

Each stage invocation is one MLflow run (``StageRun``), tagged so that a user can find it from DVC
and filter one ``dvc repro``: stage, git commit and dirty flag, params hash, DVC experiment name and
a pipeline-run id shared by all stages of one reproduction.

Tracking never kills a training run by accident, and never answers "nothing there" when it could not
look. Every MLflow call retries transient failures (a locked SQLite file, a server that does not
answer) with exponential backoff within a time budget, then raises ``TrackingUnavailable`` (one line:
the store and the cause). Budgets, in seconds, from the environment:

- ``PIPELINE_TRACKING_CONNECT_S`` (default 15): reaching the store when a stage or command starts;
- ``PIPELINE_TRACKING_OUTAGE_S`` (default 600): how long a running stage keeps working while the store
  is unavailable; its metrics are buffered meanwhile and sent when the store is back;
- ``PIPELINE_SQLITE_BUSY_S`` (default 5): how long one SQLite statement waits for another writer's lock.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from .errors import TrackingUnavailable
from .retry import (
    FIRST_RETRY_DELAY_S,
    MAX_RETRY_DELAY_S,
    Retrying,
    StoreOutageFilter,
    call,
    connect_budget_s,
    diagnose,
    outage_budget_s,
    sqlite_busy_s,
    unavailable,
)

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "PIPELINE_RUN_ID"
TAG_STAGE = "pipeline.stage"
TAG_PIPELINE_RUN = "pipeline.run_id"
TAG_PARAMS_HASH = "pipeline.params_hash"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "pipeline.git_dirty"
TAG_DVC_EXP = "pipeline.dvc_exp_name"


def project_root() -> Path:
    """The DVC/git root: DVC_ROOT when run by DVC, else the nearest folder holding dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".dvc").is_dir():
            return folder
    return here


def embedded_uri(root: Path | None = None) -> str:
    return f"sqlite:///{(root or project_root()).resolve() / 'mlflow.db'}"


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(root)


def artifact_root(root: Path | None = None) -> Path:
    return (root or project_root()).resolve() / "mlartifacts"


# ------------------------------------------------------------------------------------------ store access
def _mlflow(root: Path | None = None):
    """Import MLflow pointed at our store (the import is slow, so it is done lazily)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's own HTTP retries take ~4 min to give up on a dead server; ``call`` retries instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    import mlflow

    _install_sqlite_busy_timeout()
    _quiet_store_outage_tracebacks()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


_BUSY_PRAGMA = re.compile(r"\s*PRAGMA\s+busy_timeout\s*=", re.IGNORECASE)


@functools.cache
def _install_sqlite_busy_timeout() -> None:
    """MLflow makes every SQLite session wait up to 20 s for a lock; a training loop would stall that
    long per attempt. Rewrite its ``PRAGMA busy_timeout`` to PIPELINE_SQLITE_BUSY_S: ``call`` does the
    longer waiting, with backoff, and a running stage keeps working in between."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def busy_timeout(conn, cursor, statement, parameters, context, executemany):
        if _BUSY_PRAGMA.match(statement):
            milliseconds = int(1000 * sqlite_busy_s())
            statement = f"PRAGMA busy_timeout = {milliseconds};"
        return statement, parameters

    event.listen(Engine, "before_cursor_execute", busy_timeout, retval=True)


@functools.cache
def _quiet_store_outage_tracebacks() -> None:
    logging.getLogger("mlflow.store.db.utils").addFilter(StoreOutageFilter())


def client(root: Path | None = None, budget_s: float | None = None):
    """An MlflowClient on our store whose calls retry for ``budget_s`` (default: the connect budget)."""
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    _mlflow(root)
    budget = connect_budget_s() if budget_s is None else budget_s
    _create_sqlite_schema_once(uri, budget)
    raw = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return Retrying(raw, budget)


_schema_ready: set[str] = set()


def _create_sqlite_schema_once(uri: str, budget_s: float) -> None:
    """Let one process at a time open a SQLite store for the first time.

    MLflow creates and migrates the schema when it first opens a database; two processes doing that
    on the same new file (two stages or screen runs started together on a fresh checkout) both run the
    migrations and one dies on ``duplicate column name``. A file lock beside the database serialises
    that first open; once this process has opened the store, later clients skip the lock.
    """
    target = sqlite_target(uri)
    if target is None or uri in _schema_ready:
        return
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    path = target[0]
    if not path.parent.is_dir():
        return  # check_store names the missing folder
    lock = FileLock(f"{path}.lock")

    def first_open():  # the constructor opens (and migrates) the store: only under the lock
        call(
            lambda: MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1),
            budget_s=budget_s,
        )

    try:
        lock.acquire(timeout=max(budget_s, 1.0))
    except Timeout:
        cause = f"another process held {lock.lock_file} for {budget_s:g} s"
        raise unavailable(cause, transient=True) from None
    except OSError:  # a read-only folder: nothing can migrate there; check_store says what is wrong
        first_open()
        return
    try:
        first_open()
    finally:
        lock.release()
    _schema_ready.add(uri)


def sqlite_target(uri: str) -> tuple[Path, str] | None:
    """(database file, sqlite3 connect target) of a ``sqlite://`` URI; None for other stores."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    database = url.database or ""
    query = dict(url.query)
    if str(query.pop("uri", "")).lower() in ("true", "1"):
        path = Path(database.removeprefix("file:"))
        return path, f"file:{quote(str(path))}" + (f"?{urlencode(query)}" if query else "")
    return Path(database), f"file:{quote(database)}"


def check_store(root: Path | None = None) -> None:
    """Fail fast, in one line, when the store cannot be reached or written: called before a stage does
    any work. Retries within the connect budget."""
    budget = connect_budget_s()
    target = sqlite_target(tracking_uri(root))
    if target is not None:
        path, connect_to = target
        if path.exists():
            call(_probe_sqlite_write, connect_to, budget_s=budget)
        elif not path.parent.is_dir():
            raise unavailable(f"folder {path.parent} does not exist", transient=False)
    client(root, budget_s=budget).search_experiments(max_results=1)


def _probe_sqlite_write(connect_to: str) -> None:
    """Write the database header's user_version back unchanged and roll back: fails on a read-only
    file (or one opened read-only), waits for another writer's lock."""
    busy_s = sqlite_busy_s()
    connection = sqlite3.connect(connect_to, uri=True, timeout=busy_s, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        connection.execute(f"PRAGMA user_version = {version}")
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def experiment_id(name: str, root: Path | None = None) -> str:
    """Get or create the experiment; embedded stores get an absolute artifact location."""
    mlclient = client(root)
    experiment = mlclient.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    # (Not a test of the env var: mlflow.set_tracking_uri() itself exports MLFLOW_TRACKING_URI.)
    if tracking_uri(root) == embedded_uri(root):
        # MLflow's default "./mlruns" is relative to whatever the cwd is; pin it to the project.
        location = (artifact_root(root) / name).as_uri()
    try:
        return mlclient.create_experiment(name, artifact_location=location)
    except TrackingUnavailable:
        raise
    except Exception:  # created concurrently by another stage process
        experiment = mlclient.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ------------------------------------------------------------------------------------------ run identity
def pipeline_run_id() -> str:
    """An id shared by every stage of one ``dvc repro`` (or ``dvc exp run``).

    DVC starts each stage as a child of one long-lived ``dvc`` process, so that process's pid and
    start time identify the reproduction. ``PIPELINE_RUN_ID`` overrides it (e.g. on a cluster).
    Outside DVC each call gets a fresh id.
    """
    if os.environ.get(PIPELINE_RUN_ENV):
        return os.environ[PIPELINE_RUN_ENV]
    try:
        import psutil

        process = psutil.Process().parent()
        while process is not None:
            cmdline = " ".join(process.cmdline())
            if any(Path(part).name == "dvc" for part in process.cmdline()[:2]) or "dvc.cli" in cmdline:
                token = f"{os.uname().nodename}:{process.pid}:{process.create_time()}"
                return hashlib.sha256(token.encode()).hexdigest()[:12]
            process = process.parent()
    except Exception as err:  # psutil can fail in exotic sandboxes; fall back to a fresh id
        log.debug("could not inspect parent processes: %s", err)
    return uuid.uuid4().hex[:12]


def git_state(root: Path | None = None) -> tuple[str, bool]:
    root = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit, bool(status.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", True


# ------------------------------------------------------------------------------------------ stage runs
class StageRun:
    """One MLflow run for one stage invocation; a context manager.

    ``resume_run_id`` continues an earlier run (a stage resumed from its checkpoint), otherwise a new
    run is started and the flattened params are logged. Starting fails fast (connect budget); once
    running, metrics are buffered while the store is unavailable and sent when it is back, and only an
    outage longer than the outage budget raises ``TrackingUnavailable``.
    """

    def __init__(
        self,
        stage: str,
        params: Mapping[str, Any],
        params_hash: str,
        *,
        experiment: str,
        resume_run_id: str | None = None,
        system_metrics: bool = False,
        root: Path | None = None,
    ):
        self.stage = stage
        self.params = dict(params)
        self.params_hash = params_hash
        self.experiment = experiment
        self.resume_run_id = resume_run_id
        self.system_metrics = system_metrics
        self.root = root or project_root()
        self.run_id: str | None = None
        self._mlflow = None
        self._client = None
        self._queued: list = []
        self._outage_since: float | None = None  # monotonic time of the first failed flush
        self._next_flush = 0.0
        self._flush_delay = FIRST_RETRY_DELAY_S

    def __enter__(self) -> StageRun:
        from mlflow.exceptions import MlflowException

        from .config import flatten

        mlflow = _mlflow(self.root)
        self._mlflow = mlflow
        self._client = client(self.root, budget_s=outage_budget_s())
        budget = connect_budget_s()
        exp_id = experiment_id(self.experiment, self.root)
        run = None
        if self.resume_run_id:
            try:
                run = call(
                    mlflow.start_run,
                    run_id=self.resume_run_id,
                    log_system_metrics=self.system_metrics or None,
                    budget_s=budget,
                )
                log.info("resuming MLflow run %s", self.resume_run_id)
            except MlflowException as err:
                log.warning("cannot resume MLflow run %s (%s); starting a new run", self.resume_run_id, err)
        if run is None:
            run = call(
                mlflow.start_run,
                experiment_id=exp_id,
                run_name=f"{self.stage}-{uuid.uuid4().hex[:6]}",
                log_system_metrics=self.system_metrics or None,
                budget_s=budget,
            )
            flat = {key: _param_value(value) for key, value in flatten(self.params).items()}
            call(mlflow.log_params, flat, budget_s=budget)
        self.run_id = run.info.run_id
        commit, dirty = git_state(self.root)
        tags = {
            TAG_STAGE: self.stage,
            TAG_PIPELINE_RUN: pipeline_run_id(),
            TAG_PARAMS_HASH: self.params_hash,
            TAG_GIT_COMMIT: commit,
            TAG_GIT_DIRTY: str(dirty).lower(),
        }
        if os.environ.get("DVC_EXP_NAME"):
            tags[TAG_DVC_EXP] = os.environ["DVC_EXP_NAME"]
        call(mlflow.set_tags, tags, budget_s=budget)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        # The store already failed us: one quick attempt, so the stage stops now with its own error.
        budget = 0.0 if exc_type is not None and issubclass(exc_type, TrackingUnavailable) else None
        try:
            self.flush_metrics(wait=True, budget_s=budget)
            self._client_with(budget).set_terminated(self.run_id, status)
        except TrackingUnavailable:
            if exc_type is None:
                raise
            log.error("could not close MLflow run %s: the store is unavailable", self.run_id)
        finally:
            self._leave_run(status)

    def _client_with(self, budget_s: float | None):
        return self._client if budget_s is None else client(self.root, budget_s=budget_s)

    def _leave_run(self, status: str) -> None:
        """Pop the run off MLflow's active-run stack and stop its system-metrics monitor; the status
        was written just before (MLflow's end_run writes it again, an idempotent update)."""
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            try:
                self._mlflow.end_run(status=status)
            except Exception as err:  # the store went away again; the run stays RUNNING in it
                if diagnose(err) is None:
                    raise

    # -- logging helpers
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics now and send them (they stay buffered while the store is unavailable)."""
        self.queue_metrics(metrics, 0 if step is None else step)
        self.flush_metrics()

    def log_metric_series(self, name: str, values: Iterable[float], steps: Iterable[int]) -> None:
        """Log a whole series at once (one batched call, not one call per point)."""
        for value, step in zip(values, steps, strict=True):
            self.queue_metrics({name: value}, step)
        self.flush_metrics()

    def queue_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics for ``step`` now, send them with the next ``flush_metrics`` (one database
        transaction for many steps: per-update metrics without a per-update round trip)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queued.extend(
            Metric(name, float(value), now, int(step))
            for name, value in metrics.items()
            if value is not None and _is_finite(value)
        )

    @property
    def buffered(self) -> int:
        """Metric values recorded but not yet in the store."""
        return len(self._queued)

    def flush_metrics(self, *, wait: bool = False, budget_s: float | None = None) -> None:
        """Send the queued metrics. While the store is unavailable they stay queued and later calls
        retry with exponential backoff (a training loop is not held up); once it has been unavailable
        for the outage budget, or at once for a store that cannot be written, ``TrackingUnavailable``.
        ``wait`` retries now within the outage budget (or ``budget_s``): the end of a run."""
        if not self._queued or (not wait and time.monotonic() < self._next_flush):
            return
        outage = outage_budget_s()
        if wait:
            budget = outage if budget_s is None else budget_s
            if self._outage_since is not None:
                budget = min(budget, max(0.0, outage - (time.monotonic() - self._outage_since)))
        else:
            budget = 0.0
        try:
            self._send_queued(budget)
        except TrackingUnavailable as err:
            self._note_outage(err, outage, give_up=wait)
            return
        if self._outage_since is not None:
            log.info("tracking store is back after %.0f s; buffered metrics sent", self._down_for())
        self._outage_since, self._flush_delay, self._next_flush = None, FIRST_RETRY_DELAY_S, 0.0

    def _send_queued(self, budget_s: float) -> None:
        mlclient = client(self.root, budget_s=budget_s)
        while self._queued:
            chunk = self._queued[:1000]
            mlclient.log_batch(self.run_id, metrics=chunk)
            del self._queued[: len(chunk)]

    def _down_for(self) -> float:
        return 0.0 if self._outage_since is None else time.monotonic() - self._outage_since

    def _note_outage(self, err: TrackingUnavailable, outage_s: float, give_up: bool) -> None:
        transient = getattr(err, "transient", True)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if transient and not give_up:
                log.warning("%s; buffering metrics and retrying for up to %.0f s", err, outage_s)
        if give_up or not transient or self._down_for() >= outage_s:
            raise unavailable(
                getattr(err, "cause", str(err)),
                transient=transient,
                waited_s=self._down_for(),
                detail=f"{self.buffered} metric values of run {self.run_id} not logged",
            ) from err
        self._next_flush = time.monotonic() + self._flush_delay
        self._flush_delay = min(2 * self._flush_delay, MAX_RETRY_DELAY_S)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path, budget = Path(path), outage_budget_s()
        if path.is_dir():
            call(
                self._mlflow.log_artifacts,
                str(path),
                artifact_path=artifact_path or path.name,
                budget_s=budget,
            )
        else:
            call(self._mlflow.log_artifact, str(path), artifact_path=artifact_path, budget_s=budget)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        call(self._mlflow.set_tags, {k: str(v) for k, v in tags.items()}, budget_s=outage_budget_s())


TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_CELL = "pipeline.cell"


class ChildRun:
    """An MLflow run nested under a stage run (``mlflow.parentRunId``): one cell of a grid.

    ``tags`` (e.g. game, variant, seed) let the MLflow UI compare cells side by side under one metric
    name. Re-opening the same ``key`` under the same parent continues that child run (a resumed cell).
    Only the process holding the stage run logs here; remote cells send their metrics to it.
    """

    def __init__(self, parent: StageRun, key: str, tags: Mapping[str, Any]):
        self.parent, self.key, self.tags = parent, key, {k: str(v) for k, v in tags.items()}
        self.root = parent.root
        self.run_id: str | None = None
        self._queued: list = []
        self._outage_since: float | None = None  # the same buffering and backoff as the stage run
        self._next_flush = 0.0
        self._flush_delay = FIRST_RETRY_DELAY_S

    def __enter__(self) -> ChildRun:
        mlclient = client(self.root)
        existing = mlclient.search_runs(
            [experiment_id(self.parent.experiment, self.root)],
            filter_string=(
                f"tags.`{TAG_PARENT_RUN}` = '{self.parent.run_id}' and tags.`{TAG_CELL}` = '{self.key}'"
            ),
        )
        tags = {**self.tags, TAG_PARENT_RUN: self.parent.run_id, TAG_CELL: self.key}
        if existing:
            self.run_id = existing[0].info.run_id
            mlclient.update_run(self.run_id, status="RUNNING")
        else:
            run = mlclient.create_run(
                experiment_id(self.parent.experiment, self.root), run_name=self.key, tags=tags
            )
            self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "FAILED"
        try:
            self.flush_metrics(wait=True)
        finally:
            client(self.root).set_terminated(self.run_id, status=status)

    queue_metrics = StageRun.queue_metrics
    flush_metrics = StageRun.flush_metrics
    buffered = StageRun.buffered
    _send_queued = StageRun._send_queued
    _down_for = StageRun._down_for
    _note_outage = StageRun._note_outage

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        client(self.root).log_artifact(self.run_id, str(path), artifact_path=artifact_path)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _is_finite(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number and number not in (float("inf"), float("-inf"))


def run_status(run_id: str, root: Path | None = None) -> str | None:
    """RUNNING, FINISHED, FAILED or KILLED; None when the store cannot tell (unknown run, no store)."""
    try:
        return client(root).get_run(run_id).info.status
    except Exception as err:  # StageRun then reports a store it cannot reach, or starts a new run
        log.debug("cannot read the status of MLflow run %s: %s", run_id, err)
        return None


def find_runs(filter_string: str = "", experiment: str | None = None, root: Path | None = None) -> list:
    """Search runs (all experiments unless ``experiment`` is given); newest first."""
    mlclient = client(root)
    if experiment is not None:
        found = mlclient.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found else []
    else:
        ids = [e.experiment_id for e in mlclient.search_experiments()]
    if not ids:
        return []
    return mlclient.search_runs(ids, filter_string=filter_string, order_by=["attributes.start_time DESC"])
