"""Throughput of the metagrad grid: cells per hour with 1 and 2 concurrent cells (prints JSON).

    python bench/metagrad_grid.py [--params params.yaml] [--cells 4] [--updates 10] [--num-envs 4]

Tiny cells of one game (``--updates`` updates of ``--num-envs`` envs x 5 steps each) over variants and
seeds, trained twice from scratch: one after another in this process (the stage's default, no Ray,
torch's own thread count) and as Ray tasks two at a time on a local Ray (1 CPU and 1 torch thread per
cell). Wall times include starting Ray; the cells are the same in both runs and give the same results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.metagrad.grid import Cell, run_grid


def tiny_grid(params: str, cells: int, updates: int, num_envs: int, concurrent: int):
    config = load_params(params).metagrad
    game = config.games[0]
    grid = [Cell(game, variant, seed) for seed in range(cells) for variant in ("impala", "gamma_lambda")][
        :cells
    ]
    frames = updates * num_envs * 5 * config.env.frameskip
    tiny = config.model_copy(
        update={
            "num_envs": num_envs,
            "unroll": 5,
            "frames": frames,
            "device": "cpu",
            "checkpoint_every": max(1, updates // 2),
            "env": config.env.model_copy(update={"env_threads": 1}),
            "ray": config.ray.model_copy(update={"concurrent_cells": concurrent, "cpus_per_cell": 1}),
        }
    )
    return tiny, grid, frames


class Discard:
    """A cell run that drops its metrics: the benchmark times training, not MLflow."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def queue_metrics(self, metrics, step):
        pass

    def flush_metrics(self):
        pass


def timed_grid(config, cells: list[Cell]) -> float:
    with tempfile.TemporaryDirectory(prefix="grid-bench-") as folder:
        start = time.perf_counter()
        run_grid(
            config,
            cells,
            Path(folder),
            open_cell_run=lambda cell: Discard(),
            on_done=lambda o, r: None,
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--num-envs", type=int, default=4)
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray, never a cluster someone else uses

    results = {"cpu_cores": os.cpu_count(), "cells": args.cells}
    for concurrent in (1, 2):
        config, cells, frames = tiny_grid(args.params, args.cells, args.updates, args.num_envs, concurrent)
        seconds = timed_grid(config, cells)
        results[f"concurrent_{concurrent}"] = {
            "mode": "serial, no Ray" if concurrent == 1 else "Ray tasks, local Ray",
            "torch_threads_per_cell": torch.get_num_threads() if concurrent == 1 else 1,
            "frames_per_cell": frames,
            "wall_seconds": round(seconds, 2),
            "cells_per_hour": round(3600 * len(cells) / seconds, 1),
        }
        print(json.dumps({f"concurrent_{concurrent}": results[f"concurrent_{concurrent}"]}), file=sys.stderr)
    results["speedup_2_over_1"] = round(
        results["concurrent_2"]["cells_per_hour"] / results["concurrent_1"]["cells_per_hour"], 3
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
