"""MLflow tracking: the only module of the library that talks to MLflow.

Default store: a SQLite file (``mlflow.db``) and an artifact folder (``mlartifacts/``) in the project
root, addressed by absolute paths, so no server is needed. ``MLFLOW_TRACKING_URI`` points everything
at a server instead.

Each stage invocation is one MLflow run (``StageRun``), tagged so that a user can find it from DVC
and filter one ``dvc repro``: stage, git commit and dirty flag, params hash, DVC experiment name and
a pipeline-run id shared by all stages of one reproduction. Evolved losses are registered as
versions of a registered model (``register_loss`` and the ``pipeline losses`` CLI).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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


def _mlflow(root: Path | None = None):
    """Import MLflow pointed at our store (the import is slow, so it is done lazily)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


def client(root: Path | None = None):
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    _mlflow(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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
    run is started and the flattened params are logged.
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
        self._queued: list = []

    def __enter__(self) -> StageRun:
        from mlflow.exceptions import MlflowException

        from .config import flatten

        mlflow = _mlflow(self.root)
        self._mlflow = mlflow
        exp_id = experiment_id(self.experiment, self.root)
        run = None
        if self.resume_run_id:
            try:
                run = mlflow.start_run(
                    run_id=self.resume_run_id, log_system_metrics=self.system_metrics or None
                )
                log.info("resuming MLflow run %s", self.resume_run_id)
            except MlflowException as err:
                log.warning("cannot resume MLflow run %s (%s); starting a new run", self.resume_run_id, err)
        if run is None:
            run = mlflow.start_run(
                experiment_id=exp_id,
                run_name=f"{self.stage}-{uuid.uuid4().hex[:6]}",
                log_system_metrics=self.system_metrics or None,
            )
            flat = {key: _param_value(value) for key, value in flatten(self.params).items()}
            mlflow.log_params(flat)
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
        mlflow.set_tags(tags)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        try:
            self.flush_metrics()
        finally:
            self._mlflow.end_run(status=status)

    # -- logging helpers
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and _is_finite(v)}
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def log_metric_series(self, name: str, values: Iterable[float], steps: Iterable[int]) -> None:
        """Log a whole series at once (one batched call, not one call per point)."""
        for value, step in zip(values, steps, strict=True):
            self.queue_metrics({name: value}, step)
        self.flush_metrics()

    def queue_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics for ``step`` now, send them with the next ``flush_metrics`` (one database
        transaction for many steps: per-update metrics without a per-update round trip)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queued.extend(
            Metric(name, float(value), now, int(step)) for name, value in metrics.items() if _is_finite(value)
        )

    def flush_metrics(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), 1000):
            client(self.root).log_batch(self.run_id, metrics=queued[start : start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


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
            self.flush_metrics()
        finally:
            client(self.root).set_terminated(self.run_id, status=status)

    queue_metrics = StageRun.queue_metrics
    flush_metrics = StageRun.flush_metrics

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


# ------------------------------------------------------------------------------------------ loss registry
LOSS_ARTIFACT_DIR = "evolved_loss"
LOSS_FILE = "loss.pt"


def register_loss(
    run: StageRun, loss_file: Path, model_name: str, tags: Mapping[str, Any], alias: str = "candidate"
) -> str:
    """Log ``loss_file`` under the run and register it as a new version of ``model_name``."""
    mlclient = client(run.root)
    run.log_artifact(loss_file, artifact_path=LOSS_ARTIFACT_DIR)
    try:
        mlclient.get_registered_model(model_name)
    except Exception:
        mlclient.create_registered_model(
            model_name, description="Loss functions evolved by EPG (pipeline evolve stage)."
        )
    version = mlclient.create_model_version(
        model_name,
        source=f"runs:/{run.run_id}/{LOSS_ARTIFACT_DIR}",
        run_id=run.run_id,
        tags={k: str(v) for k, v in tags.items()},
    )
    mlclient.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/name@alias`` or ``models:/name/3`` -> (name, alias-or-version)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, ref = body.split("@", 1)
    elif "/" in body:
        name, ref = body.rsplit("/", 1)
    else:
        raise ValueError(f"registry URI {uri!r} names no version or alias")
    return name, ref


def resolve_version(model_name: str, ref: str, root: Path | None = None):
    """A registry ModelVersion by version number or alias."""
    mlclient = client(root)
    if ref.isdigit():
        return mlclient.get_model_version(model_name, ref)
    return mlclient.get_model_version_by_alias(model_name, ref)


def download_loss(uri: str, root: Path | None = None) -> bytes:
    """The bytes of a registry version's loss file (``models:/epg-loss@champion``); no temp files remain."""
    mlflow = _mlflow(root)
    with tempfile.TemporaryDirectory(prefix="epg-loss-") as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
        candidates = [local] if local.is_file() else sorted(local.rglob(LOSS_FILE))
        if not candidates:
            raise FileNotFoundError(f"{uri} holds no {LOSS_FILE}")
        return candidates[0].read_bytes()


def list_versions(model_name: str, root: Path | None = None) -> list[dict]:
    mlclient = client(root)
    try:
        registered = mlclient.get_registered_model(model_name)
    except Exception:
        return []
    aliases_by_version: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases_by_version.setdefault(str(version), []).append(alias)
    versions = mlclient.search_model_versions(f"name='{model_name}'")
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        rows.append(
            {
                "version": str(version.version),
                "aliases": sorted(aliases_by_version.get(str(version.version), [])),
                "run_id": version.run_id,
                "source": version.source,
                "tags": dict(version.tags or {}),
                "created": version.creation_timestamp,
            }
        )
    return rows


def set_alias(model_name: str, version: str, alias: str, root: Path | None = None) -> None:
    client(root).set_registered_model_alias(model_name, alias, str(version))


def set_version_tags(
    model_name: str, version: str, tags: Mapping[str, Any], root: Path | None = None
) -> None:
    mlclient = client(root)
    for key, value in tags.items():
        mlclient.set_model_version_tag(model_name, str(version), key, str(value))


def export_version(model_name: str, ref: str, destination: Path, root: Path | None = None) -> Path:
    """Copy the loss file of a version (number or alias) to ``destination`` (file or folder)."""
    version = resolve_version(model_name, ref, root)
    payload = download_loss(f"models:/{model_name}/{version.version}", root)
    destination = Path(destination)
    if destination.is_dir():
        destination = destination / LOSS_FILE
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(payload)
    return destination
