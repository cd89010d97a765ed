"""The metagrad stage: train every configured variant on every configured game, same seed and frames."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import METAGRAD_VARIANTS, PipelineConfig
from ..devices import resolve_device
from ..io import torch_load, write_csv, write_json
from ..plots import line_plot, smooth
from ..prepare import atari_score_table
from ..seeding import variant_seed
from ..stage import resumable_stage_run
from .train import (
    History,
    VariantResult,
    export_model,
    limit_cpu_threads_for,
    train_variant,
)

log = logging.getLogger(__name__)


def run_metagrad(
    config: PipelineConfig, models_dir: Path, metrics_path: Path, plots_dir: Path, checkpoint_dir: Path
) -> dict:
    cfg = config.metagrad
    limit_cpu_threads_for(resolve_device(cfg.device, "metagrad.device"))
    with resumable_stage_run("metagrad", config, checkpoint_dir) as (run, _):
        run.set_tags({"torch_threads": torch.get_num_threads()})
        results: dict[str, dict[str, VariantResult]] = {}
        for game in cfg.games:
            seed = variant_seed(config.seed, game)
            for variant in cfg.variants:
                result, learner = train_variant(
                    cfg, game, variant, seed, checkpoint_dir / f"{game}_{variant}.pt", tracker=run
                )
                model_path = export_model(learner, result, cfg, models_dir / game / f"{variant}.pt")
                run.log_artifact(model_path, artifact_path=f"models/{game}")
                results.setdefault(game, {})[variant] = result
                log.info(
                    "%s/%s: %d frames, last-10 return %s, gamma %.4f, lambda %.3f, %.0f frames/s",
                    game,
                    variant,
                    result.frames,
                    result.final_return,
                    result.gamma,
                    result.lambda_,
                    result.frames_per_second,
                )
        histories = {game: {v: r.history for v, r in variants.items()} for game, variants in results.items()}
        for path in write_curves(histories, plots_dir):
            run.log_artifact(path, artifact_path="plots")
        metrics = {
            game: {
                variant: {
                    "frames": r.frames,
                    "updates": r.updates,
                    "episodes": r.episodes,
                    "final_return_last10": r.final_return,
                    "gamma": r.gamma,
                    "lambda": r.lambda_,
                    "frames_per_second": r.frames_per_second,
                }
                for variant, r in variants.items()
            }
            for game, variants in results.items()
        }
        metrics["mlflow_run_id"] = run.run_id
        write_json(metrics_path, metrics)
        return metrics


def write_curves(histories: dict[str, dict[str, History]], plots_dir: Path) -> list[Path]:
    """Per game: raw return vs frames and gamma/lambda vs frames, as DVC CSVs and PNGs."""
    paths = []
    for game, variants in histories.items():
        for variant, h in variants.items():
            paths.append(
                write_csv(
                    plots_dir / f"returns_{game}_{variant}.csv",
                    [
                        {"frames": f, "episode_return": v}
                        for f, v in zip(h.episode_frames, h.episode_returns, strict=True)
                    ],
                    fieldnames=["frames", "episode_return"],
                )
            )
            paths.append(
                write_csv(
                    plots_dir / f"eta_{game}_{variant}.csv",
                    [
                        {"frames": f, "gamma": g, "lambda": lam}
                        for f, g, lam in zip(h.update_frames, h.gammas, h.lambdas, strict=True)
                    ],
                    fieldnames=["frames", "gamma", "lambda"],
                )
            )
        scores = atari_score_table()["games"].get(game)
        paths.append(
            line_plot(
                plots_dir / f"returns_{game}.png",
                {v: (h.episode_frames, smooth(h.episode_returns, 10)) for v, h in variants.items()},
                xlabel="frames",
                ylabel="raw episode return (moving avg of 10)",
                title=f"{game}: return vs frames",
                reference_lines={"random": scores["random"], "human": scores["human"]} if scores else None,
            )
        )
        for name, attribute in (("gamma", "gammas"), ("lambda", "lambdas")):
            paths.append(
                line_plot(
                    plots_dir / f"{name}_{game}.png",
                    {v: (h.update_frames, getattr(h, attribute)) for v, h in variants.items()},
                    xlabel="frames",
                    ylabel=name,
                    title=f"{game}: {name} vs frames",
                )
            )
    return paths


def checkpoint_histories(checkpoint_dir: Path) -> dict[str, dict[str, History]]:
    """Histories of every ``<game>_<variant>.pt`` training checkpoint in a metagrad checkpoint folder.

    Works on a stage that is still running or was stopped: the curves so far, without its outputs.
    """
    histories: dict[str, dict[str, History]] = {}
    for path in sorted(Path(checkpoint_dir).glob("*.pt")):
        variant = max((v for v in METAGRAD_VARIANTS if path.stem.endswith(f"_{v}")), key=len, default=None)
        if variant is None:
            continue
        game = path.stem[: -len(variant) - 1]
        histories.setdefault(game, {})[variant] = History(**torch_load(path)["history"])
    if not histories:
        raise FileNotFoundError(
            f"no metagrad training checkpoints (<game>_<variant>.pt with variant one of "
            f"{', '.join(METAGRAD_VARIANTS)}) in {checkpoint_dir}"
        )
    return histories
