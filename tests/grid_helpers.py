"""Tiny metagrad grids shared by the grid tests (test_grid.py) and the two-node Ray tests
(test_grid_cluster.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from pipeline.config import MetagradConfig
from pipeline.io import torch_load
from pipeline.metagrad.grid import grid_cells, run_grid

ROOT = Path(__file__).resolve().parents[1]


def write_params(path: Path, metagrad: dict, seed: int = 0, drop: tuple[str, ...] = ()) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = seed
    params["metagrad"].update(metagrad)
    for key in drop:
        params["metagrad"].pop(key)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


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


def serial_reference(checkpoint_root: Path) -> dict:
    """The reference: the tiny grid's 4 cells, one after another in this process, one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        outcomes, logged = run_tiny_grid(tiny_config(), checkpoint_root)
    finally:
        torch.set_num_threads(threads)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    return {"outcomes": outcomes, "logged": logged}


def agent_state(agent: bytes | Path | dict) -> dict:
    """The network of an exported agent (its file or bytes), or a state dict as it is."""
    if isinstance(agent, dict):
        return agent
    return torch_load(agent.read_bytes() if isinstance(agent, Path) else agent)["state_dict"]


def assert_same_agent(model: bytes | Path | dict, reference: bytes | Path | dict) -> None:
    state, reference = agent_state(model), agent_state(reference)
    assert list(state) == list(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
