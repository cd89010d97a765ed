"""The metagrad stage: train every configured variant on every configured game, same seed and frames."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import PipelineConfig
from ..io import write_csv, write_json
from ..plots import line_plot, smooth
from ..stage import resumable_stage_run
from .train import VariantResult, export_model, train_variant, variant_seed

log = logging.getLogger(__name__)


def run_metagrad(
    config: PipelineConfig, models_dir: Path, metrics_path: Path, plots_dir: Path, checkpoint_dir: Path
) -> dict:
    cfg = config.metagrad
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
        for path in write_curves(results, plots_dir):
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


def write_curves(results: dict[str, dict[str, VariantResult]], plots_dir: Path) -> list[Path]:
    """Per game: raw return vs frames and gamma/lambda vs frames, as DVC CSVs and PNGs."""
    paths = []
    for game, variants in results.items():
        for variant, r in variants.items():
            h = r.history
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
        paths.append(
            line_plot(
                plots_dir / f"returns_{game}.png",
                {
                    v: (r.history.episode_frames, smooth(r.history.episode_returns, 10))
                    for v, r in variants.items()
                },
                xlabel="frames",
                ylabel="raw episode return (moving avg of 10)",
                title=f"{game}: return vs frames",
            )
        )
        for name, attribute in (("gamma", "gammas"), ("lambda", "lambdas")):
            paths.append(
                line_plot(
                    plots_dir / f"{name}_{game}.png",
                    {
                        v: (r.history.update_frames, getattr(r.history, attribute))
                        for v, r in variants.items()
                    },
                    xlabel="frames",
                    ylabel=name,
                    title=f"{game}: {name} vs frames",
                )
            )
    return paths
