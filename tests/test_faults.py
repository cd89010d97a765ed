"""Faults injected as a user meets them: an unreachable tracking server, a SQLite file locked by another
process or opened read-only, registry URIs that name nothing, an unreachable Ray cluster, a busy port,
SIGTERM to the UI, a stray folder among agents. Each must end in one line and a non-zero exit (or, for a
brief lock, in no harm at all). Budgets are shrunk through the environment so every test takes seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from helpers import run_python

from pipeline import cli, retry, tracking
from pipeline.errors import ServiceUnavailable, TrackingUnavailable
from pipeline.preflight import check_ray_address
from pipeline.stage import stage_main
from pipeline.tracking import StageRun

PROJECT = Path(__file__).resolve().parents[1]
EXPERIMENT = "fault-test"

pytestmark = pytest.mark.timeout(120)


def closed_port() -> int:
    """A loopback port nothing listens on (bound once by us, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def project(tmp_path, monkeypatch, empty_db) -> Path:
    """A project folder with its own SQLite store and a copy of params.yaml; short retry budgets."""
    (tmp_path / "dvc.yaml").touch()
    shutil.copyfile(PROJECT / "params.yaml", tmp_path / "params.yaml")
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    for name in ("PIPELINE_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(retry.CONNECT_ENV, "1")
    monkeypatch.setenv(retry.OUTAGE_ENV, "60")
    monkeypatch.setenv(retry.SQLITE_BUSY_ENV, "0.2")
    yield tmp_path
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def edit_params(folder: Path, **sections) -> Path:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for dotted, value in sections.items():
        *parents, key = dotted.split("__")
        node = params
        for name in parents:
            node = node[name]
        node[key] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(stage: str, params: Path, capsys, body=None) -> tuple[int, str]:
    """stage_main in this process; (exit status, stderr). The default body must never run."""

    def never(config, root):
        raise AssertionError("the stage body ran although the preflight should have stopped it")

    with pytest.raises(SystemExit) as stopped:
        stage_main(stage, body or never, ["--params", str(params)])
    return stopped.value.code, capsys.readouterr().err


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


LOCKER = (
    "import sqlite3, sys\n"
    "connection = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "connection.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
    "connection.execute('COMMIT')\n"
)


@contextmanager
def sqlite_locked(database: Path):
    """Another process holds an exclusive lock on ``database`` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ------------------------------------------------------------------------------------------ retry logic
def test_call_retries_a_locked_store_then_succeeds():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert retry.call(flaky, budget_s=30) == "done"
    assert len(attempts) == 3


def test_call_gives_up_after_its_budget_and_at_once_on_a_read_only_store():
    def locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(TrackingUnavailable, match=r"unavailable \(database is locked by another process\)"):
        retry.call(locked, budget_s=0.3)

    attempts = []

    def read_only():
        attempts.append(1)
        raise sqlite3.OperationalError("attempt to write a readonly database")

    with pytest.raises(
        TrackingUnavailable, match="cannot be used: attempt to write a readonly database; make it"
    ):
        retry.call(read_only, budget_s=30)
    assert len(attempts) == 1


def test_a_read_only_store_found_mid_run_stops_it_at_once(project, monkeypatch):
    with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
        # the store's database is opened read-only from now on, as after a permission change
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///file:{project / 'mlflow.db'}?mode=ro&uri=true")
        with pytest.raises(TrackingUnavailable) as stopped:
            run.log_metrics({"loss": 1.0}, step=0)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    assert str(stopped.value).endswith(
        "cannot be used: attempt to write a readonly database; make it (and its folder) writable or point "
        "MLFLOW_TRACKING_URI elsewhere; 1 metric values of run "
        f"{run.run_id} not logged"
    )


def test_call_passes_other_errors_through_untouched():
    def broken():
        raise KeyError("not a store problem")

    with pytest.raises(KeyError):
        retry.call(broken, budget_s=30)


# ------------------------------------------------------------------------------------------ item 2
def test_cli_against_an_unreachable_server_fails_in_one_line(tmp_path):
    (tmp_path / "dvc.yaml").touch()
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, retry.CONNECT_ENV: "1", "PYTHONPATH": str(PROJECT)}
    for args in (["losses", "list"], ["models", "list"]):
        result = run_python(["-m", "pipeline", *args], tmp_path, env, timeout=90)
        assert result.returncode == 69, result.stderr
        assert result.stdout == ""
        line = one_line(result.stderr)
        assert line.startswith(f"error: MLflow tracking store {uri} unavailable (connection refused)")


def test_stage_against_an_unreachable_server_stops_before_any_work(project, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, err = run_stage("prepare", project / "params.yaml", capsys)
    assert code == 69
    assert one_line(err).startswith(f"prepare: MLflow tracking store {uri} unavailable (connection refused)")


# ------------------------------------------------------------------------------------------ item 4
def test_metrics_logged_during_a_brief_lock_are_buffered_then_flushed(project):
    database = project / "mlflow.db"
    with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
        run.log_metrics({"fitness": 1.0}, step=0)
        assert run.buffered == 0
        with sqlite_locked(database):
            run.log_metrics({"fitness": 2.0}, step=1)  # the store is locked: kept, training goes on
            run.log_metrics({"fitness": 3.0}, step=2)
            assert run.buffered == 2
        run.queue_metrics({"fitness": 4.0}, step=3)
    history = tracking.client().get_metric_history(run.run_id, "fitness")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    assert tracking.client().get_run(run.run_id).info.status == "FINISHED"


def test_a_lock_outlasting_the_outage_budget_stops_the_stage_in_one_line(project, monkeypatch, capsys):
    monkeypatch.setenv(retry.OUTAGE_ENV, "0.5")
    database = project / "mlflow.db"

    def training(config, root):
        with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
            with sqlite_locked(database):
                for step in range(200):
                    run.log_metrics({"loss": float(step)}, step=step)
                    time.sleep(0.05)
        raise AssertionError("the outage never stopped the stage")

    code, err = run_stage("evolve", project / "params.yaml", capsys, body=training)
    assert code == 69
    line = one_line(err)
    store = f"sqlite:///{database}"
    assert line.startswith(
        f"evolve: MLflow tracking store {store} unavailable (database is locked by another"
    )
    assert "metric values of run" in line


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_evolve_survives_a_lock_held_across_generations(project, monkeypatch, caplog):
    """The real training loop: the store is locked during generations 1 and 2; evolve finishes, every
    generation's metrics reach the store, and the loss is registered."""
    from epg_helpers import with_tiny_evolve

    from pipeline.config import PipelineConfig
    from pipeline.epg.evolve import run_evolve
    from pipeline.epg.problem import OpenAIES
    from pipeline.io import write_json
    from pipeline.prepare import task_splits
    from pipeline.registry import list_versions

    params = yaml.safe_load((project / "params.yaml").read_text())
    with_tiny_evolve(params, generations=4)
    config = PipelineConfig.model_validate(params)
    tasks = write_json(project / "tasks.json", task_splits(config.prepare, config.seed))
    lock, original_step, calls = sqlite_locked(project / "mlflow.db"), OpenAIES.step, {"n": 0}

    def step_with_outage(self):
        calls["n"] += 1
        if calls["n"] == 2:
            lock.__enter__()  # after generation 0 is logged
        if calls["n"] == 4:
            lock.__exit__(None, None, None)  # generations 1 and 2 were logged into a locked store
        return original_step(self)

    monkeypatch.setattr(OpenAIES, "step", step_with_outage)
    try:
        metrics = run_evolve(
            config, tasks, project / "loss.pt", project / "m.json", project / "plots", project / "ckpt"
        )
    finally:
        if calls["n"] in (2, 3):
            lock.__exit__(None, None, None)
    assert calls["n"] == 4
    assert any("buffering metrics" in record.getMessage() for record in caplog.records), "the lock never bit"
    history = tracking.client().get_metric_history(metrics["mlflow_run_id"], "fitness/center")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    assert [row["version"] for row in list_versions(config.tracking.registered_model)] == ["1"]


# ------------------------------------------------------------------------------------------ item 6
def test_unreachable_ray_address_fails_within_its_budget():
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ServiceUnavailable, match=f"RAY_ADDRESS={address}: no Ray cluster answers"):
        check_ray_address(address, budget_s=0.5)
    with pytest.raises(ServiceUnavailable, match="is not HOST:PORT"):
        check_ray_address("nonsense", budget_s=0.5)
    check_ray_address("auto", budget_s=0.5)  # Ray's own discovery: not ours to check


def test_evolve_with_ray_actors_and_an_unreachable_ray_stops_before_any_work(project, monkeypatch, capsys):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("PIPELINE_RAY_CONNECT_S", "0.5")
    params = edit_params(project, evolve__num_actors=2)
    code, err = run_stage("evolve", params, capsys)
    assert code == 69
    assert one_line(err).startswith(f"evolve: RAY_ADDRESS={address}: no Ray cluster answers")


# ------------------------------------------------------------------------------------------ item 7
@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/fault-loss@nope", "'fault-loss' has no alias 'nope'"),
        ("models:/fault-loss/3", "'fault-loss' has no version 3"),
        ("models:/no-such-model/3", "no registered model 'no-such-model' in sqlite:///"),
        ("models:/fault-loss", "names no version or alias"),
    ],
)
def test_registry_uri_in_params_is_resolved_before_any_run(project, capsys, uri, message):
    tracking.client().create_registered_model("fault-loss")
    params = edit_params(project, evaluate__epg__loss=uri)
    code, err = run_stage("evaluate", params, capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"evaluate: evaluate.epg.loss: {uri}: ")
    assert message in line
    assert tracking.find_runs() == []  # no MLflow run was created


def test_registry_uri_that_resolves_lets_the_stage_run(project, capsys):
    from pipeline.registry import register_loss

    loss = project / "loss.pt"
    loss.write_bytes(b"an evolved loss")
    with StageRun("evolve", {}, "h", experiment=EXPERIMENT) as run:
        register_loss(run, loss, "fault-loss", {"fitness": 1.0}, alias="champion")
    params = edit_params(project, evaluate__epg__loss="models:/fault-loss@champion")
    ran = []
    stage_main(
        "evaluate", lambda config, root: ran.append(config.evaluate.epg.loss), ["--params", str(params)]
    )
    assert ran == ["models:/fault-loss@champion"]


# ------------------------------------------------------------------------------------------ item 8
def test_read_only_store_is_refused_in_one_line_before_any_work(project, monkeypatch, capsys):
    database = project / "mlflow.db"
    # chmod cannot make a file read-only for root; SQLite's read-only open mode can.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///file:{database}?mode=ro&uri=true")
    code, err = run_stage("prepare", project / "params.yaml", capsys)
    assert code == 69
    line = one_line(err)
    assert line.startswith("prepare: MLflow tracking store sqlite:///file:")
    assert "cannot be used: attempt to write a readonly database" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_file_is_refused(project, capsys):
    (project / "mlflow.db").chmod(0o444)
    code, err = run_stage("prepare", project / "params.yaml", capsys)
    assert code == 69
    assert "readonly database" in one_line(err)


# ------------------------------------------------------------------------------------------ item 9
def ui_command(folder: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "PYTHONPATH": str(PROJECT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ui", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ui_on_a_busy_port_exits_non_zero_in_one_line(project):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ui = ui_command(project, port)
        out, err = ui.communicate(timeout=60)
    assert ui.returncode == 2
    assert one_line(err) == f"error: port {port} on 127.0.0.1 is already in use; pick another with --port"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_sigterm_to_ui_stops_the_server_and_its_workers(project):
    import psutil

    port = closed_port()
    ui = ui_command(project, port)
    try:
        deadline = time.monotonic() + 180
        while not _listening(port):
            assert ui.poll() is None, ui.stderr.read()
            assert time.monotonic() < deadline, "the MLflow UI never listened"
            time.sleep(0.5)
        server = [p for p in psutil.Process(ui.pid).children(recursive=True)]
        assert server, "the UI runs no server process"
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
    finally:
        if ui.poll() is None:
            ui.kill()
    assert not _listening(port)
    alive = []
    for process in server:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


# ------------------------------------------------------------------------------------------ item 10
def test_score_names_a_non_game_folder_instead_of_crashing(tmp_path, capsys):
    (tmp_path / "notes" / "draft").mkdir(parents=True)
    (tmp_path / "notes" / "draft" / "seed0.pt").write_bytes(b"not an agent")
    assert cli.main(["score", str(tmp_path), "--episodes", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'notes'} is not a game folder: 'notes' is no Atari game")


def test_score_names_a_file_that_is_not_an_agent(tmp_path, capsys):
    (tmp_path / "pong" / "impala").mkdir(parents=True)
    (tmp_path / "pong" / "impala" / "seed0.pt").write_bytes(b"not an agent")
    assert cli.main(["score", str(tmp_path), "--episodes", "1"]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"error: {tmp_path / 'pong' / 'impala' / 'seed0.pt'} is not a trained agent"
    )


def test_score_rejects_a_diagnostic_temperature_for_the_seed_table(tmp_path, capsys):
    args = ["score", str(tmp_path), "--temperature", "0.01", "--seeds-json", str(tmp_path / "s.json")]
    assert cli.main(args) == 2
    assert one_line(capsys.readouterr().err) == (
        "error: --seeds-json holds the protocol's scores (temperature 1); drop --temperature"
    )
    with pytest.raises(SystemExit):  # argparse: "--temperature: must be > 0, got 0.0"
        cli.main(["score", str(tmp_path), "--temperature", "0"])
    assert "must be > 0, got 0.0" in capsys.readouterr().err
