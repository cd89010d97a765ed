"""Tests of the metagrad grid: cells and their seeds, the config, the evaluation over seeds, and (marked
``ray``) the grid on a two-node Ray cluster on loopback, with and without a killed cell worker."""

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
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from pipeline.config import ConfigError, MetagradConfig, load_params
from pipeline.evaluation.atari_eval import AgentScore, paired_difference, summarize_seeds
from pipeline.evaluation.run import discover_agents
from pipeline.io import torch_load
from pipeline.metagrad import grid
from pipeline.metagrad.grid import Cell, cell_config, grid_cells, run_grid, train_cell
from pipeline.metagrad.train import train_variant
from pipeline.seeding import variant_seed

ROOT = Path(__file__).resolve().parents[1]


# Serial cells run with the torch threads of a Ray cell (cpus_per_cell = 1): same bits.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_params(path: Path, metagrad: dict, seed: int = 0, drop: tuple[str, ...] = ()) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = seed
    params["metagrad"].update(metagrad)
    for key in drop:
        params["metagrad"].pop(key)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------- config
def test_seeds_default_to_the_top_level_seed(tmp_path):
    """A params file without metagrad.seeds trains the top-level seed, as the stage did before seeds."""
    config = load_params(write_params(tmp_path / "p.yaml", {}, seed=7, drop=("seeds",)))
    assert config.metagrad.seeds == [7]
    config = load_params(write_params(tmp_path / "p.yaml", {"seeds": [0, 3]}, seed=7))
    assert config.metagrad.seeds == [0, 3]


@pytest.mark.parametrize(
    ("metagrad", "expected"),
    [
        ({"ray": {"concurrent_cels": 2}}, "metagrad.ray.concurrent_cels: unknown key; allowed here: "),
        ({"ray": {"concurrent_cells": 0}}, "metagrad.ray.concurrent_cells = 0: "),
        ({"ray": {"gpus_per_cell": -1}}, "metagrad.ray.gpus_per_cell = -1: "),
        ({"seeds": [1, 1]}, "metagrad.seeds = [1, 1]: seeds are listed more than once"),
        ({"seeds": []}, "metagrad.seeds = []: "),
        ({"seeds": [-1]}, "metagrad.seeds.0 = -1: "),
    ],
)
def test_bad_grid_params_give_one_line_naming_the_key(tmp_path, metagrad, expected):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path / "p.yaml", metagrad))
    assert len(error.value.lines) == 1 and expected in error.value.lines[0], error.value.lines


# --------------------------------------------------------------------------------------------- cells
def tiny_config(**overrides) -> MetagradConfig:
    """Cells of 6 updates (2 envs x 5 steps x 4 frames), a checkpoint every 3 updates."""
    base = dict(
        games=["pong"],
        variants=["impala", "gamma_lambda"],
        seeds=[0, 1],
        frames=6 * 40,
        num_envs=2,
        unroll=5,
        device="cpu",
        checkpoint_every=3,
        env={"env_threads": 1},
    )
    return MetagradConfig(**{**base, **overrides})


def test_cells_cover_the_grid_and_keep_the_seed_rule(tmp_path):
    config = tiny_config()
    cells = grid_cells(config)
    assert [c.key for c in cells] == [
        "pong/impala/seed0",
        "pong/gamma_lambda/seed0",
        "pong/impala/seed1",
        "pong/gamma_lambda/seed1",
    ]
    cell = cells[3]
    assert cell.training_seed == variant_seed(1, "pong") == Cell("pong", "impala", 1).training_seed
    assert cell.path_under(tmp_path) == tmp_path / "pong/gamma_lambda/seed1.pt"
    assert cell.tags() == {"game": "pong", "variant": "gamma_lambda", "seed": "1"}
    one = cell_config(config.model_copy(update={"seeds": [0, 1, 5], "games": ["pong", "breakout"]}), cell)
    assert one == cell_config(config, cell)  # growing the grid keeps a cell's checkpoint valid


def test_a_meta_learner_sweep_keeps_the_baseline_cells(tmp_path):
    """{} learns no eta, so its cell config ignores metagrad.meta (but the embedding's size): a sweep of
    the meta lr reuses the {} checkpoints. Justified by the numbers: {} trained under two different
    meta-learners gives the same agent bit for bit."""
    config = tiny_config(frames=3 * 40)
    meta = config.meta.model_copy(update={"lr": 0.5, "objective": "value_error", "init_gamma": 0.9})
    other = config.model_copy(update={"meta": meta})
    baseline, meta_learner = Cell("pong", "impala", 0), Cell("pong", "gamma_lambda", 0)
    assert cell_config(other, baseline) == cell_config(config, baseline)
    assert cell_config(other, meta_learner) != cell_config(config, meta_learner)
    wider = other.model_copy(update={"meta": other.meta.model_copy(update={"embedding_dim": 8})})
    assert cell_config(wider, baseline) != cell_config(config, baseline)
    agents = [
        train_variant(c, "pong", "impala", baseline.training_seed, tmp_path / f"{i}.pt")[1].net.state_dict()
        for i, c in enumerate((config, other))  # the raw configs, not cell_config's
    ]
    assert list(agents[0]) == list(agents[1])
    for name, tensor in agents[0].items():
        assert torch.equal(tensor, agents[1][name]), name


def test_ray_is_used_for_concurrent_cells_or_a_cluster_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not grid.uses_ray(tiny_config().ray)
    assert grid.uses_ray(tiny_config(ray={"concurrent_cells": 2}).ray)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert grid.uses_ray(tiny_config().ray)


class RecordingRun:
    """Stands in for a cell's MLflow child run."""

    def __init__(self, log: dict, key: str):
        self.log, self.key = log, key

    def __enter__(self):
        self.log.setdefault(self.key, {"steps": [], "flushes": 0})
        return self

    def __exit__(self, *exc):
        return None

    def queue_metrics(self, metrics, step):
        self.log[self.key]["steps"].append((step, dict(metrics)))

    def flush_metrics(self):
        self.log[self.key]["flushes"] += 1


def run_tiny_grid(config: MetagradConfig, checkpoint_root: Path) -> tuple[dict, dict]:
    """(outcomes by cell key, metrics logged by cell key) of a grid run."""
    logged: dict = {}
    outcomes = run_grid(
        config,
        grid_cells(config),
        checkpoint_root,
        open_cell_run=lambda cell: RecordingRun(logged, cell.key),
        on_done=lambda outcome, run: None,
    )
    return {o.cell.key: o for o in outcomes}, logged


@pytest.fixture(scope="module")
def serial_grid(tmp_path_factory) -> dict:
    """The reference: the tiny grid's 4 cells, one after another in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        outcomes, logged = run_tiny_grid(tiny_config(), tmp_path_factory.mktemp("serial"))
    finally:
        torch.set_num_threads(threads)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    return {"outcomes": outcomes, "logged": logged}


def test_serial_grid_trains_each_cell_as_train_variant_does(serial_grid, tmp_path):
    outcomes, logged = serial_grid["outcomes"], serial_grid["logged"]
    assert list(outcomes) == [c.key for c in grid_cells(tiny_config())]
    for key, outcome in outcomes.items():
        assert (outcome.result.frames, outcome.result.updates, outcome.resumed_at_frames) == (240, 6, 0)
        assert [step for step, _ in logged[key]["steps"]] == outcome.result.history.update_frames
        assert "episode_return" in {name for _, m in logged[key]["steps"] for name in m} or not (
            outcome.result.history.episode_returns
        )
    # seed 0 of the grid is the stage's single-seed run of seed 0: same derivation, same bits
    cell = Cell("pong", "gamma_lambda", 0)
    direct, learner = train_variant(
        cell_config(tiny_config(), cell), "pong", "gamma_lambda", variant_seed(0, "pong"), tmp_path / "c.pt"
    )
    assert direct.history == outcomes[cell.key].result.history
    assert_same_agent(outcomes[cell.key].model, learner.net.state_dict())
    # another seed, another agent
    seed0, seed1 = (torch_load(outcomes[f"pong/impala/seed{k}"].model)["state_dict"] for k in (0, 1))
    assert any(not torch.equal(seed0[name], seed1[name]) for name in seed0)


def assert_same_agent(model: bytes | Path, reference) -> None:
    state = torch_load(model.read_bytes() if isinstance(model, Path) else model)["state_dict"]
    if isinstance(reference, (bytes, Path)):
        reference = torch_load(reference.read_bytes() if isinstance(reference, Path) else reference)[
            "state_dict"
        ]
    assert list(state) == list(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def test_a_finished_cell_is_not_trained_again(serial_grid, tmp_path):
    config = tiny_config(seeds=[0], variants=["impala"])
    cell = grid_cells(config)[0]
    first = train_cell(config, cell, tmp_path)
    again = train_cell(config, cell, tmp_path)
    assert again.resumed_at_frames == first.result.frames == 240
    assert again.result.history == first.result.history == serial_grid["outcomes"][cell.key].result.history


def test_cells_are_child_runs_of_the_stage_run_and_a_resumed_cell_continues_its_own(tmp_path, monkeypatch):
    import mlflow

    from pipeline.tracking import ChildRun, StageRun, client

    (tmp_path / "dvc.yaml").touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_RUN_ID", "test-grid")
    cell, other = Cell("pong", "gamma_lambda", 1), Cell("pong", "impala", 1)
    try:
        with StageRun("metagrad", {}, "h", experiment="grid-test") as stage:
            with ChildRun(stage, cell.key, cell.tags()) as first:
                first.queue_metrics({"episode_return": 1.0, "gamma": float("nan")}, step=40)
            with ChildRun(stage, cell.key, cell.tags()) as again:  # the cell resumed
                again.queue_metrics({"episode_return": 2.0}, step=80)
            with ChildRun(stage, other.key, other.tags()) as sibling:
                pass
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    assert again.run_id == first.run_id != sibling.run_id
    run = client().get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pong/gamma_lambda/seed1"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == stage.run_id
    assert (tags["game"], tags["variant"], tags["seed"]) == ("pong", "gamma_lambda", "1")
    history = client().get_metric_history(first.run_id, "episode_return")
    assert [(m.step, m.value) for m in history] == [(40, 1.0), (80, 2.0)]
    assert "gamma" not in run.data.metrics  # not finite: dropped, as in the stage run


# --------------------------------------------------------------------------------------------- evaluation
def cell_scores(mean: float, hns: float) -> AgentScore:
    return AgentScore(
        mean_score=mean,
        ci_low=mean - 1,
        ci_high=mean + 1,
        hns=hns,
        train_frames=100,
        gamma=0.99,
        lambda_=1.0,
        scores=[mean] * 3,
        start_frames=[1, 2, 3],
        lengths=[50] * 3,
    )


def test_seed_summary_and_paired_difference_on_known_numbers():
    baseline = summarize_seeds({1: cell_scores(-20.0, 0.02), 0: cell_scores(-21.0, 0.0)}, 0.95)
    assert list(baseline.seeds) == ["0", "1"]
    assert baseline.mean_score == pytest.approx(-20.5)
    # t_{0.975, 1} = 12.706; s = 0.7071; half width = 12.706 * 0.7071 / sqrt(2) = 6.353
    assert (baseline.ci_low, baseline.ci_high) == pytest.approx((-26.853, -14.147), abs=1e-3)
    assert baseline.hns == pytest.approx(0.01) and baseline.num_seeds == 2
    learned = summarize_seeds(
        {0: cell_scores(-18.0, 0.08), 1: cell_scores(-16.0, 0.1), 2: cell_scores(0, 0)}, 0.95
    )
    diff = paired_difference(learned.seeds, baseline.seeds, 0.95)
    assert diff.per_seed == {"0": 3.0, "1": 4.0} and diff.seeds == 2  # seed 2 has no baseline
    assert diff.mean == pytest.approx(3.5)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((3.5 - 6.353, 3.5 + 6.353), abs=1e-3)


def test_atari_results_are_typed_and_serialise_to_the_former_layout():
    """The JSON of ``score --out`` and the report's input keep their keys, in their order."""
    baseline = summarize_seeds({0: cell_scores(-21.0, 0.0), 1: cell_scores(-20.0, 0.02)}, 0.95)
    learned = summarize_seeds({0: cell_scores(-18.0, 0.08), 1: cell_scores(-16.0, 0.1)}, 0.95)
    learned = replace(learned, diff_vs_impala=paired_difference(learned.seeds, baseline.seeds, 0.95))
    cell = learned.seeds["1"].to_dict()
    assert list(cell) == [
        *("mean_score", "ci_low", "ci_high", "hns", "train_frames", "gamma", "lambda"),
        *("scores", "start_frames", "lengths"),
    ]
    assert cell["lambda"] == 1.0 and cell["scores"] == [-16.0] * 3
    row = learned.to_dict()
    assert list(row) == [
        *("mean_score", "ci_low", "ci_high", "hns", "hns_ci_low", "hns_ci_high", "num_seeds", "episodes"),
        *("train_frames", "gamma", "lambda", "seeds", "diff_vs_impala"),
    ]
    assert row["seeds"]["1"] == cell and row["episodes"] == 6
    assert row["diff_vs_impala"] == {
        "mean": 3.5,
        "ci_low": learned.diff_vs_impala.ci_low,
        "ci_high": learned.diff_vs_impala.ci_high,
        "seeds": 2,
        "per_seed": {"0": 3.0, "1": 4.0},
    }
    assert "diff_vs_impala" not in baseline.to_dict()  # the baseline has no difference with itself
    assert list(learned.metrics()) == [
        *("mean_score", "ci_low", "ci_high", "hns", "hns_ci_low", "hns_ci_high", "num_seeds"),
        "diff_vs_impala",
    ]
    assert list(learned.metrics()["diff_vs_impala"]) == ["mean", "ci_low", "ci_high"]


def test_agents_are_discovered_per_game_variant_and_seed(tmp_path):
    for relative in (
        "pong/gamma_lambda/seed1.pt",
        "pong/impala/seed1.pt",
        "pong/impala/seed0.pt",
        "pong/x.pt",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    agents = discover_agents(tmp_path)
    assert list(agents["pong"]) == ["impala", "gamma_lambda"]  # baseline first
    assert agents["pong"]["impala"] == {
        0: tmp_path / "pong/impala/seed0.pt",
        1: tmp_path / "pong/impala/seed1.pt",
    }


def test_evaluate_scores_every_cell_and_plots_a_band_per_variant(serial_grid, tmp_path):
    """The grid's 4 agents, played and summarised as the evaluate stage does: per game and variant
    over seeds, the paired difference with {}, the median HNS, per-seed rows; plots with seed bands."""
    from pipeline.config import AtariEvalConfig
    from pipeline.evaluation.atari_eval import evaluate_agents
    from pipeline.evaluation.run import EvaluatePaths, summary_metrics, write_atari_plots
    from pipeline.metagrad.grid import write_model
    from pipeline.metagrad.run import write_curves
    from pipeline.prepare import atari_score_table

    paths = EvaluatePaths.under(tmp_path)
    histories: dict = {}
    for outcome in serial_grid["outcomes"].values():
        write_model(outcome, paths.metagrad_models)
        cell = outcome.cell
        histories.setdefault(cell.game, {}).setdefault(cell.variant, {})[cell.seed] = outcome.result.history
    write_curves(histories, paths.plots_dir / "metagrad")
    config = AtariEvalConfig(episodes=2, max_episode_frames=400)
    atari = evaluate_agents(discover_agents(paths.metagrad_models), atari_score_table(), config, 0, 0.95)
    pong = atari.games["pong"]
    assert list(pong) == ["impala", "gamma_lambda"]
    for row in pong.values():
        per_seed = [cell.mean_score for cell in row.seeds.values()]
        assert list(row.seeds) == ["0", "1"] and row.num_seeds == 2
        assert row.mean_score == pytest.approx(sum(per_seed) / 2)
        assert row.ci_low <= row.mean_score <= row.ci_high
        assert row.hns == pytest.approx((row.mean_score + 20.7) / (14.6 + 20.7))
    diff = pong["gamma_lambda"].diff_vs_impala
    assert diff.mean == pytest.approx(pong["gamma_lambda"].mean_score - pong["impala"].mean_score)
    assert atari.hns["gamma_lambda"]["median"] == pytest.approx(pong["gamma_lambda"].hns)
    metrics = summary_metrics({"epg": SimpleNamespace(splits={}), "atari": atari, "promotion": {}}, "run")
    assert metrics["atari"]["pong"]["gamma_lambda"]["diff_vs_impala"]["mean"] == diff.mean
    figures = write_atari_plots(atari, paths)
    assert set(figures) == {
        "Human-normalised score per game and variant",
        "pong: return during training",
        "pong: gamma during training",
        "pong: lambda during training",
        "pong: training",
    }
    assert all(path.stat().st_size > 0 for path in figures.values())
    assert figures["pong: training"].name == "training_pong.png"  # the README's one Pong figure


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
