"""Tests for pipeline.tracking against throw-away SQLite MLflow stores (never the project's mlflow.db)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pipeline import tracking
from pipeline.registry import (
    UnknownReference,
    download_loss,
    export_version,
    list_versions,
    parse_model_uri,
    register_loss,
    resolve_version,
    set_alias,
    set_version_tags,
)
from pipeline.tracking import StageRun

EXPERIMENT = "test-exp"
MODEL = "test-loss"


def _isolate(monkeypatch, folder: Path) -> None:
    """cwd, project root and temp files in ``folder``; no inherited run identity."""
    (folder / "dvc.yaml").touch()
    monkeypatch.chdir(folder)
    for name in ("PIPELINE_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    scratch = folder / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # download_loss's mkdtemp


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    """A fresh SQLite store named by MLFLOW_TRACKING_URI; yields an MlflowClient on it."""
    _isolate(monkeypatch, tmp_path)
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tracking.client()
    _end_active_runs()


def _end_active_runs() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


PARAMS = {"seed": 3, "evolve": {"popsize": 8, "inner": {"lr": 0.01, "policy_hidden": [64, 64]}}}


# ------------------------------------------------------------------------------------------ stage runs
def test_stage_run_logs_flattened_params_and_identity_tags(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    with StageRun("evolve", PARAMS, "abc123", experiment=EXPERIMENT) as run:
        pass
    logged = store.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name.startswith("evolve-")
    assert store.get_experiment(logged.info.experiment_id).name == EXPERIMENT
    assert logged.data.params == {
        "seed": "3",
        "evolve.popsize": "8",
        "evolve.inner.lr": "0.01",
        "evolve.inner.policy_hidden": "[64, 64]",
    }
    tags = logged.data.tags
    assert tags["pipeline.stage"] == "evolve"
    assert tags["pipeline.params_hash"] == "abc123"
    assert len(tags["pipeline.run_id"]) == 12
    assert tags["pipeline.dvc_exp_name"] == "my-exp"
    # tmp_path is not a git repository
    assert tags["mlflow.source.git.commit"] == "unknown"
    assert tags["pipeline.git_dirty"] == "true"


def test_stage_run_tags_git_commit_and_dirty_flag(store, tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "dvc.yaml")
    _git(tmp_path, "commit", "-q", "-m", "init")
    head = _git(tmp_path, "rev-parse", "HEAD")

    with StageRun("prepare", {}, "h", experiment=EXPERIMENT, root=tmp_path) as clean:
        pass
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # a tracked file changes
    with StageRun("prepare", {}, "h", experiment=EXPERIMENT, root=tmp_path) as dirty:
        pass

    clean_tags = store.get_run(clean.run_id).data.tags
    dirty_tags = store.get_run(dirty.run_id).data.tags
    assert len(head) == 40
    assert clean_tags["mlflow.source.git.commit"] == head
    assert clean_tags["pipeline.git_dirty"] == "false"
    assert dirty_tags["mlflow.source.git.commit"] == head
    assert dirty_tags["pipeline.git_dirty"] == "true"


def test_metric_series_queued_flushed_and_batched(store):
    with StageRun("metagrad", {}, "h", experiment=EXPERIMENT) as run:
        run.queue_metrics({"loss": 1.5, "fps": 100}, step=0)
        run.queue_metrics({"loss": 1.25, "bad": float("nan")}, step=1)
        run.flush_metrics()
        run.queue_metrics({"loss": 1.0}, step=2)  # flushed when the run ends
        run.log_metric_series("curve", [0.1, 0.2, 0.3], [10, 20, 30])
        run.log_metrics({"final": 7, "skipped_none": None, "skipped_inf": float("inf")}, step=5)

    history = store.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1.5),
        (1, 1.25),
        (2, 1.0),
    ]
    curve = store.get_metric_history(run.run_id, "curve")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [
        (10, 0.1),
        (20, 0.2),
        (30, 0.3),
    ]
    assert [(m.step, m.value) for m in store.get_metric_history(run.run_id, "fps")] == [(0, 100.0)]
    metrics = store.get_run(run.run_id).data.metrics
    assert metrics["final"] == 7.0
    assert not {"bad", "skipped_none", "skipped_inf"} & set(metrics)


def test_log_metric_series_rejects_mismatched_lengths(store):
    with StageRun("metagrad", {}, "h", experiment=EXPERIMENT) as run:
        with pytest.raises(ValueError):
            run.log_metric_series("curve", [0.1, 0.2], [1])


def test_file_and_directory_artifacts(store, tmp_path):
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}\n')
    plots = tmp_path / "plots"
    (plots / "sub").mkdir(parents=True)
    (plots / "a.csv").write_text("x,y\n1,2\n")
    (plots / "sub" / "b.csv").write_text("x\n3\n")

    with StageRun("evaluate", {}, "h", experiment=EXPERIMENT) as run:
        run.log_artifact(report)
        run.log_artifact(report, artifact_path="reports")
        run.log_artifact(plots)
        run.set_tags({"custom": 5})

    top = {f.path: f.is_dir for f in store.list_artifacts(run.run_id)}
    assert top == {"report.json": False, "reports": True, "plots": True}
    assert [f.path for f in store.list_artifacts(run.run_id, "reports")] == ["reports/report.json"]
    assert {f.path for f in store.list_artifacts(run.run_id, "plots")} == {"plots/a.csv", "plots/sub"}
    assert [f.path for f in store.list_artifacts(run.run_id, "plots/sub")] == ["plots/sub/b.csv"]
    local = Path(store.download_artifacts(run.run_id, "plots/sub/b.csv", str(tmp_path / "dl")))
    assert local.read_text() == "x\n3\n"
    assert store.get_run(run.run_id).data.tags["custom"] == "5"


# ------------------------------------------------------------------------------------------ run identity
def test_pipeline_run_id_env_var_overrides(store, monkeypatch):
    monkeypatch.setenv("PIPELINE_RUN_ID", "cluster-job-42")
    assert tracking.pipeline_run_id() == "cluster-job-42"
    with StageRun("prepare", {}, "h", experiment=EXPERIMENT) as run:
        pass
    assert store.get_run(run.run_id).data.tags["pipeline.run_id"] == "cluster-job-42"


def test_pipeline_run_id_outside_dvc_is_fresh_each_call(monkeypatch):
    monkeypatch.delenv("PIPELINE_RUN_ID", raising=False)
    first, second = tracking.pipeline_run_id(), tracking.pipeline_run_id()
    assert first != second
    assert len(first) == len(second) == 12
    int(first, 16)


# ------------------------------------------------------------------------------------------ resume / status
def test_resume_continues_the_same_run(store):
    with StageRun("evolve", PARAMS, "h1", experiment=EXPERIMENT) as first:
        first.log_metrics({"fitness": 1.0}, step=0)
    with StageRun("evolve", PARAMS, "h1", experiment=EXPERIMENT, resume_run_id=first.run_id) as resumed:
        resumed.log_metrics({"fitness": 2.0}, step=1)

    assert resumed.run_id == first.run_id
    run = store.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["evolve.popsize"] == "8"
    history = sorted(store.get_metric_history(first.run_id, "fitness"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0)]
    runs = store.search_runs([run.info.experiment_id])
    assert len(runs) == 1


def test_resume_with_unknown_run_id_starts_a_new_run(store):
    with StageRun("evolve", PARAMS, "h1", experiment=EXPERIMENT, resume_run_id="0" * 32) as run:
        run.log_metrics({"fitness": 3.0}, step=0)
    assert run.run_id != "0" * 32
    logged = store.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["seed"] == "3"  # params are logged for the new run
    assert logged.data.metrics == {"fitness": 3.0}


def test_failing_body_marks_run_failed_and_reraises(store):
    with pytest.raises(RuntimeError, match="boom"):
        with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
            run.queue_metrics({"partial": 1.0}, step=0)
            raise RuntimeError("boom")
    logged = store.get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.metrics == {"partial": 1.0}  # queued metrics are flushed on the way out


def test_keyboard_interrupt_marks_run_killed(store):
    with pytest.raises(KeyboardInterrupt):
        with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
            raise KeyboardInterrupt
    assert store.get_run(run.run_id).info.status == "KILLED"


def test_find_runs_filters_by_tag(store):
    with StageRun("prepare", {}, "h", experiment=EXPERIMENT):
        pass
    with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as evolve:
        pass
    found = tracking.find_runs("tags.`pipeline.stage` = 'evolve'", experiment=EXPERIMENT)
    assert [r.info.run_id for r in found] == [evolve.run_id]
    assert tracking.find_runs(experiment="no-such-experiment") == []


# ------------------------------------------------------------------------------------------ default store
def test_default_store_is_in_project_root_with_absolute_artifact_location(tmp_path, monkeypatch, empty_db):
    _isolate(monkeypatch, tmp_path)
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")  # the default store: <project root>/mlflow.db
    # setenv first so that monkeypatch restores the variable: mlflow.set_tracking_uri sets it in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unused")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    try:
        assert tracking.project_root() == tmp_path.resolve()
        assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
        with StageRun("prepare", {"seed": 0}, "h", experiment=EXPERIMENT) as run:
            run.log_artifact(tmp_path / "dvc.yaml")
        mlclient = tracking.client()
        experiment = mlclient.get_experiment_by_name(EXPERIMENT)
        location = urlparse(experiment.artifact_location)
        assert location.scheme == "file"
        assert Path(location.path) == tmp_path.resolve() / "mlartifacts" / EXPERIMENT
        assert (tmp_path / "mlflow.db").is_file()
        assert [f.path for f in mlclient.list_artifacts(run.run_id)] == ["dvc.yaml"]
        assert list((tmp_path / "mlartifacts" / EXPERIMENT).rglob("dvc.yaml"))
    finally:
        _end_active_runs()


def test_experiment_id_gets_or_creates(store):
    first = tracking.experiment_id("made-here")
    assert tracking.experiment_id("made-here") == first
    assert store.get_experiment(first).name == "made-here"


# ------------------------------------------------------------------------------------------ registry
def _loss_file(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True)
    path = folder / "loss.pt"
    path.write_bytes(payload)
    return path


@pytest.fixture
def registry(store, tmp_path):
    """Two versions of MODEL, registered from two evolve runs; returns their payloads and run ids."""
    payloads = {"1": b"loss-version-one", "2": b"loss-version-two"}
    run_ids = {}
    for version, payload in payloads.items():
        loss = _loss_file(tmp_path / f"v{version}", payload)
        with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
            assert (
                register_loss(run, loss, MODEL, {"fitness": float(version) * 10, "family": "point_goal"})
                == version
            )
        run_ids[version] = run.run_id
    return payloads, run_ids


def test_register_loss_creates_versions_and_moves_candidate_alias(store, registry):
    _, run_ids = registry
    rows = list_versions(MODEL)
    assert [r["version"] for r in rows] == ["1", "2"]
    assert [r["aliases"] for r in rows] == [[], ["candidate"]]
    assert [r["run_id"] for r in rows] == [run_ids["1"], run_ids["2"]]
    assert rows[0]["source"] == f"runs:/{run_ids['1']}/evolved_loss"
    assert rows[0]["tags"] == {"fitness": "10.0", "family": "point_goal"}
    assert rows[1]["tags"]["fitness"] == "20.0"
    assert [f.path for f in store.list_artifacts(run_ids["1"], "evolved_loss")] == ["evolved_loss/loss.pt"]
    assert {k: str(v) for k, v in store.get_registered_model(MODEL).aliases.items()} == {"candidate": "2"}


def test_list_versions_of_unknown_model_is_empty(store):
    assert list_versions("never-registered") == []


def test_resolve_version_by_number_and_alias(store, registry):
    assert str(resolve_version(MODEL, "1").version) == "1"
    assert str(resolve_version(MODEL, "2").version) == "2"
    assert str(resolve_version(MODEL, "candidate").version) == "2"
    with pytest.raises(UnknownReference, match=f"'{MODEL}' has no version 7"):
        resolve_version(MODEL, "7")
    with pytest.raises(UnknownReference, match=f"'{MODEL}' has no alias 'nope'"):
        resolve_version(MODEL, "nope")
    with pytest.raises(UnknownReference, match="no registered model 'other'"):
        resolve_version("other", "1")


def test_set_alias_points_alias_at_version(store, registry):
    set_alias(MODEL, "1", "champion")
    assert str(resolve_version(MODEL, "champion").version) == "1"
    set_alias(MODEL, "2", "champion")
    assert str(resolve_version(MODEL, "champion").version) == "2"
    assert {r["version"]: r["aliases"] for r in list_versions(MODEL)} == {
        "1": [],
        "2": ["candidate", "champion"],
    }


def test_download_loss_by_alias_and_version_returns_the_right_bytes(store, registry, tmp_path):
    payloads, _ = registry
    set_alias(MODEL, "1", "champion")
    assert download_loss(f"models:/{MODEL}@champion") == payloads["1"]
    assert download_loss(f"models:/{MODEL}/2") == payloads["2"]
    assert not list((tmp_path / "scratch").iterdir()), "download_loss left temporary files behind"


def test_export_version_to_folder_and_file(store, registry, tmp_path):
    payloads, _ = registry
    folder = tmp_path / "export"
    folder.mkdir()
    into_folder = export_version(MODEL, "candidate", folder)
    assert into_folder == folder / "loss.pt"
    assert into_folder.read_bytes() == payloads["2"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_version(MODEL, "1", tmp_path / "deep" / "dir" / "v1.pt")
    assert not (tmp_path / "deep").exists()
    as_file = export_version(MODEL, "1", tmp_path / "deep" / "dir" / "v1.pt", parents=True)
    assert as_file == tmp_path / "deep" / "dir" / "v1.pt"
    assert as_file.read_bytes() == payloads["1"]


def test_set_version_tags(store, registry):
    set_version_tags(MODEL, "1", {"promoted_by": "test", "score": 1.5})
    tags = list_versions(MODEL)[0]["tags"]
    assert tags["promoted_by"] == "test" and tags["score"] == "1.5"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("models:/epg-loss@champion", ("epg-loss", "champion")),
        ("models:/epg-loss/3", ("epg-loss", "3")),
        ("models:/team/epg-loss/12", ("team/epg-loss", "12")),
        ("models:/epg-loss@a@b", ("epg-loss", "a@b")),
    ],
)
def test_parse_model_uri_accepts_alias_and_version(uri, expected):
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models/epg/loss.pt", "not a registry URI"),
        ("runs:/abc/evolved_loss", "not a registry URI"),
        ("models:/epg-loss", "names no version or alias"),
    ],
)
def test_parse_model_uri_rejects_bad_input(uri, message):
    with pytest.raises(ValueError, match=message):
        parse_model_uri(uri)


_OPEN_WHEN_TOLD = """
import sys, time
from pathlib import Path
from pipeline import tracking
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
tracking.check_store()
"""


def test_two_processes_creating_a_fresh_store_at_once_both_succeed(tmp_path):
    """MLflow migrates a new SQLite file when it first opens it; two stages starting together on a
    fresh checkout both ran the migrations and one died on 'duplicate column name' (seen when two
    screen cells were started at once). Both imports finish first, then a file starts both opens."""
    (tmp_path / "dvc.yaml").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_WHEN_TOLD, str(go)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(6)  # importing pipeline.tracking and mlflow takes a few seconds per process
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)
    assert (tmp_path / "mlflow.db").is_file()
