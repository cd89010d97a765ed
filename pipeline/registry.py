"""The MLflow Model Registry, for every model the pipeline registers (``epg-loss``, ``maml-policy``, ...).

A version is the file(s) a stage logged under its run in one artifact folder, registered from
``runs:/RUN/FOLDER``. Aliases name the roles: a stage sets ``candidate`` when it registers a version;
the evaluate stage moves ``champion`` by the rule in ``evaluation.promotion``. ``python -m pipeline
models ...`` manages any registered model through these functions.

Everything goes through ``tracking.client`` (retries, one-line ``TrackingUnavailable``); references that
name nothing raise ``UnknownReference`` with a message naming the model and the version or alias.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import tracking
from .errors import BadReference
from .retry import call, connect_budget_s, outage_budget_s

LOSS_MODEL_DESCRIPTION = "Loss functions evolved by EPG (pipeline evolve stage)."
LOSS_ARTIFACT_DIR = "evolved_loss"
LOSS_FILE = "loss.pt"


class UnknownReference(BadReference, LookupError):
    """A registered model, version or alias that does not exist."""


# ------------------------------------------------------------------------------------------ references
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


def _does_not_exist(err: Exception) -> bool:
    # MLflow: RESOURCE_DOES_NOT_EXIST for models and versions, INVALID_PARAMETER_VALUE for aliases.
    return getattr(err, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def registered_model(model_name: str, root: Path | None = None):
    """The RegisteredModel, or None when no model has that name."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client(root).get_registered_model(model_name)
    except MlflowException as err:
        if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def resolve_version(model_name: str, ref: str, root: Path | None = None):
    """A registry ModelVersion by version number or alias; ``UnknownReference`` when there is none."""
    from mlflow.exceptions import MlflowException

    if registered_model(model_name, root) is None:
        raise UnknownReference(f"no registered model {model_name!r} in {tracking.tracking_uri(root)}")
    mlclient = tracking.client(root)
    try:
        if ref.isdigit():
            return mlclient.get_model_version(model_name, ref)
        return mlclient.get_model_version_by_alias(model_name, ref)
    except MlflowException as err:
        if not _does_not_exist(err):
            raise
        what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
        raise UnknownReference(f"{model_name!r} has no {what}") from None


def check_reference(uri: str, root: Path | None = None):
    """Resolve a ``models:/`` URI now (before a stage does any work); its ModelVersion."""
    try:
        name, ref = parse_model_uri(uri)
    except ValueError as err:
        raise BadReference(str(err)) from None
    return resolve_version(name, ref, root)


# ------------------------------------------------------------------------------------------ versions
def register_file(
    run: tracking.StageRun,
    path: Path,
    model_name: str,
    *,
    artifact_dir: str,
    tags: Mapping[str, Any],
    alias: str | None = "candidate",
    description: str = "",
) -> str:
    """Log ``path`` under the run in ``artifact_dir`` and register it as a new version of
    ``model_name`` (created on first use); ``alias`` then points at the new version."""
    mlclient = tracking.client(run.root, budget_s=outage_budget_s())
    run.log_artifact(path, artifact_path=artifact_dir)
    if registered_model(model_name, run.root) is None:
        mlclient.create_registered_model(model_name, description=description or None)
    version = mlclient.create_model_version(
        model_name,
        source=f"runs:/{run.run_id}/{artifact_dir}",
        run_id=run.run_id,
        tags={k: str(v) for k, v in tags.items()},
    )
    if alias:
        mlclient.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def register_loss(
    run: tracking.StageRun,
    loss_file: Path,
    model_name: str,
    tags: Mapping[str, Any],
    alias: str = "candidate",
) -> str:
    """Register an evolved loss file (EPG's evolve stage) as a new version of ``model_name``."""
    return register_file(
        run,
        loss_file,
        model_name,
        artifact_dir=LOSS_ARTIFACT_DIR,
        tags=tags,
        alias=alias,
        description=LOSS_MODEL_DESCRIPTION,
    )


def list_models(root: Path | None = None) -> list[str]:
    return sorted(model.name for model in tracking.client(root).search_registered_models())


def list_versions(model_name: str, root: Path | None = None) -> list[dict]:
    """All versions, oldest first; [] when no model has that name (an unreachable store raises)."""
    registered = registered_model(model_name, root)
    if registered is None:
        return []
    aliases_by_version: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases_by_version.setdefault(str(version), []).append(alias)
    versions = tracking.client(root).search_model_versions(f"name='{model_name}'")
    return [
        {
            "version": str(version.version),
            "aliases": sorted(aliases_by_version.get(str(version.version), [])),
            "run_id": version.run_id,
            "source": version.source,
            "tags": dict(version.tags or {}),
            "created": version.creation_timestamp,
        }
        for version in sorted(versions, key=lambda v: int(v.version))
    ]


def alias_holder(model_name: str, alias: str, root: Path | None = None) -> str | None:
    """The version number ``alias`` points at, or None (no such model or alias yet)."""
    try:
        return str(resolve_version(model_name, alias, root).version)
    except UnknownReference:
        return None


def set_alias(model_name: str, version: str, alias: str, root: Path | None = None) -> None:
    tracking.client(root).set_registered_model_alias(model_name, alias, str(version))


def set_version_tags(
    model_name: str, version: str, tags: Mapping[str, Any], root: Path | None = None
) -> None:
    mlclient = tracking.client(root)
    for key, value in tags.items():
        mlclient.set_model_version_tag(model_name, str(version), key, str(value))


# ------------------------------------------------------------------------------------------ files
def download_file(uri: str, file_name: str | None = None, root: Path | None = None) -> tuple[str, bytes]:
    """(name, bytes) of the file a version holds (``models:/maml-policy@champion``); no temp files remain.

    A version holding several files needs ``file_name``."""
    mlflow = tracking._mlflow(root)
    with tempfile.TemporaryDirectory(prefix="registry-") as folder:
        local = Path(
            call(
                mlflow.artifacts.download_artifacts,
                artifact_uri=uri,
                dst_path=folder,
                budget_s=connect_budget_s(),
            )
        )
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        if file_name is not None:
            files = [p for p in files if p.name == file_name]
        if len(files) != 1:
            names = ", ".join(p.name for p in files) or "no files"
            wanted = f" named {file_name}" if file_name else ""
            raise FileNotFoundError(f"{uri} holds {names}, not exactly one file{wanted}")
        return files[0].name, files[0].read_bytes()


def download_loss(uri: str, root: Path | None = None) -> bytes:
    """The bytes of a registry version's loss file (``models:/epg-loss@champion``)."""
    return download_file(uri, LOSS_FILE, root)[1]


def export_version(
    model_name: str, ref: str, destination: Path, root: Path | None = None, *, parents: bool = False
) -> Path:
    """Copy the file of a version (number or alias) to ``destination``: a file path, or an existing
    folder (the file keeps its name). A missing parent folder is an error unless ``parents``."""
    from .io import atomic_path

    version = resolve_version(model_name, ref, root)
    name, payload = download_file(f"models:/{model_name}/{version.version}", root=root)
    destination = Path(destination)
    if destination.is_dir():
        destination = destination / name
    if not destination.parent.is_dir() and not parents:
        raise FileNotFoundError(f"folder {destination.parent} does not exist")
    with atomic_path(destination) as tmp:
        tmp.write_bytes(payload)
    return destination
