"""The metagrad grid on a two-node Ray cluster on loopback (marked ``ray``): equal to the serial run, and
completing from the checkpoint of a killed cell worker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from grid_helpers import ROOT, assert_same_agent, run_tiny_grid, tiny_config, write_params

from pipeline.config import load_params
from pipeline.io import torch_load
from pipeline.metagrad.grid import Cell, cell_config, grid_cells
from pipeline.metagrad.train import train_variant

# Serial cells run with the torch threads of a Ray cell (cpus_per_cell = 1): same bits.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------- Ray cluster
# A throwaway cluster on loopback, without token authentication, as the test process (conftest.py).
LOOPBACK_CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_node(temp_dir: str, head_port: int, head: bool) -> subprocess.Popen:
    """``ray start`` (blocking, in its own session) for one node of 1 CPU on loopback."""
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port"]
    ports += ["--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--block",
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
    ]
    command += ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    for option in ports:
        command += [option, str(free_port())]
    if head:
        command += [
            "--head",
            "--port",
            str(head_port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            temp_dir,
        ]
    else:
        command += ["--address", f"127.0.0.1:{head_port}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(LOOPBACK_CLUSTER_ENV)
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM to the blocking ``ray start``: it stops the Ray processes it started; then its group."""
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)  # whatever of this node's session is left
    except ProcessLookupError:
        pass


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and a second node on 127.0.0.1, joined by RAY_ADDRESS; stopped (only these) afterwards."""
    ray = pytest.importorskip("ray")
    for name, value in LOOPBACK_CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)
    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    nodes = [start_node(temp_dir, port, head=True)]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not accepts_connections(port):  # the head's GCS is up before anyone joins
            assert time.monotonic() < deadline and nodes[0].poll() is None, "Ray head did not start"
            time.sleep(0.5)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        nodes.append(start_node(temp_dir, port, head=False))
        while sum(node["Alive"] for node in ray.nodes()) < 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, "second Ray node did not join"
            time.sleep(0.5)
        monkeypatch.setenv("RAY_ADDRESS", address)
        yield {"address": address, "nodes": nodes, "ray": ray}
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_params(tmp_path: Path) -> Path:
    config = tiny_config(ray={"concurrent_cells": 2})
    return write_params(tmp_path / "params.yaml", config.model_dump(mode="json", by_alias=True))


@pytest.mark.ray
@pytest.mark.e2e
def test_grid_on_a_two_node_cluster_equals_the_serial_run(
    two_node_cluster, serial_grid, tmp_path, monkeypatch
):
    """The metagrad stage with RAY_ADDRESS: 4 cells over 2 nodes; every cell's agent and metrics equal
    its serial run bit for bit; the metrics reach the cells' MLflow child runs through the driver."""
    from pipeline.metagrad.run import run_metagrad

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_RUN_ID", "test-grid")
    monkeypatch.chdir(tmp_path)
    config = load_params(cluster_params(tmp_path))
    metrics = run_metagrad(
        config, tmp_path / "models", tmp_path / "metagrad.json", tmp_path / "plots", tmp_path / "checkpoints"
    )
    outcomes = serial_grid["outcomes"]
    for key, outcome in outcomes.items():
        game, variant, seed = key.split("/")
        entry = metrics[game][variant][seed]
        assert (entry["frames"], entry["gamma"], entry["lambda"]) == (
            outcome.result.frames,
            outcome.result.gamma,
            outcome.result.lambda_,
        ), key
        assert entry["final_return_last10"] == outcome.result.final_return, key
        assert_same_agent(tmp_path / "models" / f"{key}.pt", outcome.model)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        children = dict(
            db.execute(
                "SELECT t.value, r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'pipeline.cell' AND r.status = 'FINISHED' AND r.run_uuid IN "
                "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?)",
                (metrics["mlflow_run_id"],),
            ).fetchall()
        )
        assert sorted(children) == sorted(outcomes)
        for key, run_id in children.items():
            steps = db.execute(
                "SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'gamma' ORDER BY step",
                (run_id,),
            ).fetchall()
            history = outcomes[key].result.history
            assert steps == list(zip(history.update_frames, history.gammas, strict=True)), key
            tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())
            assert [tags["game"], tags["variant"], "seed" + tags["seed"]] == key.split("/")


def cell_worker(nodes: list[subprocess.Popen], cell: Cell):
    """The worker process of our cluster running ``cell`` (process title ray::metagrad_cell <cell>)."""
    import psutil

    ours = {node.pid for node in nodes}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0] == f"ray::metagrad_cell {cell.key}":
            if any(parent.pid in ours for parent in process.parents()):
                return process
    return None


def kill_cell_worker_mid_run(checkpoints: Path, cell: Cell, total_frames: int, nodes, killed: list) -> None:
    """Once ``cell`` has checkpointed mid-run, SIGKILL the worker process running it."""
    path = cell.path_under(checkpoints)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if path.exists():
            try:
                frames = torch_load(path)["frames"]
            except Exception:  # a checkpoint being replaced: look again
                continue
            worker = cell_worker(nodes, cell)
            if 0 < frames < total_frames and worker is not None:
                worker.send_signal(signal.SIGKILL)
                killed.append(frames)
            return
        time.sleep(0.02)


@pytest.mark.ray
@pytest.mark.e2e
def test_grid_completes_from_the_checkpoint_of_a_killed_cell(two_node_cluster, tmp_path):
    """A cell's worker process dies mid-run: Ray retries the cell, it resumes from its checkpoint and the
    grid completes with every update of every cell in its history and its metrics; the killed cell ends
    as its un-killed serial run, bit for bit."""
    updates = 40
    config = tiny_config(frames=updates * 40, ray={"concurrent_cells": 2, "max_retries": 2})
    cells = grid_cells(config)
    target = cells[1]  # gamma_lambda, seed 0: its gamma and lambda move every update
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_cell_worker_mid_run,
        args=(tmp_path, target, config.frames, two_node_cluster["nodes"], killed),
        daemon=True,
    )
    killer.start()
    outcomes, logged = run_tiny_grid(config, tmp_path)
    killer.join(timeout=5)
    assert killed, "the cell's worker was not killed mid-run"
    resumed = outcomes[target.key]
    assert resumed.resumed_at_frames >= killed[0] > 0  # retried from the checkpoint it died after
    assert [o.resumed_at_frames for k, o in outcomes.items() if k != target.key] == [0, 0, 0]
    every_update = [40 * k for k in range(1, updates + 1)]
    for key, outcome in outcomes.items():
        history = outcome.result.history
        assert (outcome.result.frames, history.update_frames) == (config.frames, every_update), key
        assert len(history.gammas) == len(history.lambdas) == updates, key
        assert {step for step, _ in logged[key]["steps"]} == set(every_update), key  # nothing lost
    # the killed cell, resumed, is its un-killed serial run bit for bit: agent, curves and metrics
    reference, learner = train_variant(
        cell_config(config, target), target.game, target.variant, target.training_seed, tmp_path / "ref.pt"
    )
    assert resumed.result.history == reference.history
    assert (resumed.result.final_return, resumed.result.gamma, resumed.result.lambda_) == (
        reference.final_return,
        reference.gamma,
        reference.lambda_,
    )
    assert_same_agent(resumed.model, learner.net.state_dict())
    gamma_at = dict(zip(reference.history.update_frames, reference.history.gammas, strict=True))
    assert all(m["gamma"] == gamma_at[step] for step, m in logged[target.key]["steps"])  # resent too
