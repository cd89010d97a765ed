"""The metagrad stage: train every (game, variant, seed) cell of the grid, same frames for all.

Outputs: one agent per cell (``models/metagrad/<game>/<variant>/seed<k>.pt``), one MLflow child run per
cell under the stage's run, per-cell curves and per-game plots with one line per variant and a band
over seeds. Where the cells run (serially or on Ray) is ``metagrad.ray``; see ``grid.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import METAGRAD_VARIANTS, PipelineConfig
from ..devices import resolve_device
from ..io import read_csv, torch_load, write_csv, write_json
from ..plots import band_plot, smooth
from ..prepare import atari_score_table
from ..stage import resumable_stage_run
from ..tracking import ChildRun
from .grid import Cell, CellOutcome, grid_cells, run_grid, write_model
from .train import History, limit_cpu_threads_for

log = logging.getLogger(__name__)

# histories[game][variant][seed]
Histories = dict[str, dict[str, dict[int, History]]]


def run_metagrad(
    config: PipelineConfig, models_dir: Path, metrics_path: Path, plots_dir: Path, checkpoint_dir: Path
) -> dict:
    cfg = config.metagrad
    limit_cpu_threads_for(resolve_device(cfg.device, "metagrad.device"))
    # absolute: Ray workers do not share the driver's working directory
    storage = Path(cfg.ray.checkpoint_storage or checkpoint_dir).resolve()
    with resumable_stage_run("metagrad", config, checkpoint_dir) as (run, _):
        run.set_tags({"torch_threads": torch.get_num_threads(), "cells": len(grid_cells(cfg))})

        def finish_cell(outcome: CellOutcome, cell_run: ChildRun) -> None:
            model_path = write_model(outcome, models_dir)
            cell_run.log_artifact(model_path, artifact_path="model")
            r = outcome.result
            log.info(
                "%s: %d frames, last-10 return %s, gamma %.4f, lambda %.3f, %.0f frames/s",
                outcome.cell.key,
                r.frames,
                r.final_return,
                r.gamma,
                r.lambda_,
                r.frames_per_second,
            )

        outcomes = run_grid(
            cfg,
            grid_cells(cfg),
            storage,
            open_cell_run=lambda cell: ChildRun(run, cell.key, cell.tags()),
            on_done=finish_cell,
        )
        histories: Histories = {}
        for outcome in outcomes:
            cell = outcome.cell
            histories.setdefault(cell.game, {}).setdefault(cell.variant, {})[cell.seed] = (
                outcome.result.history
            )
        for path in write_curves(histories, plots_dir):
            run.log_artifact(path, artifact_path="plots")
        metrics = cell_metrics(outcomes)
        metrics["mlflow_run_id"] = run.run_id
        write_json(metrics_path, metrics)
        return metrics


def cell_metrics(outcomes: list[CellOutcome]) -> dict:
    """``metrics[game][variant]["seed<k>"]``: the DVC metrics of every cell."""
    metrics: dict = {}
    for outcome in outcomes:
        cell, r = outcome.cell, outcome.result
        metrics.setdefault(cell.game, {}).setdefault(cell.variant, {})[f"seed{cell.seed}"] = {
            "frames": r.frames,
            "updates": r.updates,
            "episodes": r.episodes,
            "final_return_last10": r.final_return,
            "gamma": r.gamma,
            "lambda": r.lambda_,
            "frames_per_second": r.frames_per_second,
        }
    return metrics


def write_curves(histories: Histories, plots_dir: Path) -> list[Path]:
    """Per cell: return and gamma/lambda vs frames as DVC CSVs; per game: PNGs with one line per
    variant (mean over seeds) and a band over seeds."""
    paths = []
    for game, variants in histories.items():
        for variant, seeds in variants.items():
            for seed, h in seeds.items():
                paths += write_cell_curves(h, plots_dir, f"{game}_{variant}_seed{seed}")
        scores = atari_score_table()["games"].get(game)
        paths.append(
            band_plot(
                plots_dir / f"returns_{game}.png",
                {
                    v: [(h.episode_frames, smooth(h.episode_returns, 10)) for h in seeds.values()]
                    for v, seeds in variants.items()
                },
                xlabel="frames",
                ylabel="raw episode return (moving avg of 10)",
                title=f"{game}: return vs frames" + seeds_note(variants),
                reference_lines={"random": scores["random"], "human": scores["human"]} if scores else None,
            )
        )
        for name, attribute in (("gamma", "gammas"), ("lambda", "lambdas")):
            paths.append(
                band_plot(
                    plots_dir / f"{name}_{game}.png",
                    {
                        v: [(h.update_frames, getattr(h, attribute)) for h in seeds.values()]
                        for v, seeds in variants.items()
                    },
                    xlabel="frames",
                    ylabel=name,
                    title=f"{game}: {name} vs frames" + seeds_note(variants),
                )
            )
    return paths


def seeds_note(variants: dict[str, dict[int, History]]) -> str:
    count = max(len(seeds) for seeds in variants.values())
    return f" (mean and range over {count} seeds)" if count > 1 else ""


def write_cell_curves(h: History, plots_dir: Path, name: str) -> list[Path]:
    return [
        write_csv(
            plots_dir / f"returns_{name}.csv",
            [
                {"frames": f, "episode_return": v}
                for f, v in zip(h.episode_frames, h.episode_returns, strict=True)
            ],
            fieldnames=["frames", "episode_return"],
        ),
        write_csv(
            plots_dir / f"eta_{name}.csv",
            [
                {"frames": f, "gamma": g, "lambda": lam}
                for f, g, lam in zip(h.update_frames, h.gammas, h.lambdas, strict=True)
            ],
            fieldnames=["frames", "gamma", "lambda"],
        ),
    ]


def csv_histories(plots_dir: Path) -> Histories:
    """The cell histories back from the stage's ``returns_<cell>.csv`` and ``eta_<cell>.csv``
    (``write_cell_curves``' inverse), for the evaluate stage, which sees the stage's outputs only.
    A cell needs both files; files of other names are not cells and are skipped."""
    histories: Histories = {}
    for returns_path in sorted(Path(plots_dir).glob("returns_*_seed*.csv")):
        name = returns_path.stem.removeprefix("returns_")
        eta_path = returns_path.with_name(f"eta_{name}.csv")
        game_variant, _, seed = name.rpartition("_seed")
        # the longest variant that ends the name: "pong_gamma_lambda" is gamma_lambda, not lambda
        suffixes = sorted(METAGRAD_VARIANTS, key=len, reverse=True)
        variant = next((v for v in suffixes if game_variant.endswith(f"_{v}")), None)
        if variant is None or not seed.isdigit() or not eta_path.is_file():
            continue
        returns, eta = read_csv(returns_path), read_csv(eta_path)
        history = History(
            episode_frames=[int(r["frames"]) for r in returns],
            episode_returns=[float(r["episode_return"]) for r in returns],
            update_frames=[int(r["frames"]) for r in eta],
            gammas=[float(r["gamma"]) for r in eta],
            lambdas=[float(r["lambda"]) for r in eta],
        )
        game = game_variant.removesuffix(f"_{variant}")
        histories.setdefault(game, {}).setdefault(variant, {})[int(seed)] = history
    return histories


def checkpoint_histories(checkpoint_dir: Path) -> Histories:
    """Histories of every ``<game>/<variant>/seed<k>.pt`` cell checkpoint in a metagrad checkpoint folder.

    Works on a stage that is still running or was stopped: the curves so far, without its outputs.
    """
    histories: Histories = {}
    for path in sorted(Path(checkpoint_dir).glob("*/*/seed*.pt")):
        variant, seed = path.parent.name, path.stem.removeprefix("seed")
        if variant not in METAGRAD_VARIANTS or not seed.isdigit():
            continue
        cell = Cell(path.parent.parent.name, variant, int(seed))
        history = History(**torch_load(path)["history"])
        histories.setdefault(cell.game, {}).setdefault(cell.variant, {})[cell.seed] = history
    if not histories:
        raise FileNotFoundError(
            f"no metagrad cell checkpoints (<game>/<variant>/seed<k>.pt with variant one of "
            f"{', '.join(METAGRAD_VARIANTS)}) in {checkpoint_dir}"
        )
    return histories
