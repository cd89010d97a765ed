"""The evaluate stage: held-out/OOD EPG evaluation, no-op Atari scores, plots, report, promotion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .. import registry, tracking
from ..config import PipelineConfig, params_hash, section_dict
from ..envs.tasks import load_tasks
from ..io import read_csv, read_json, torch_load, write_csv, write_json, write_text
from ..metagrad.milestones import cell_milestones
from ..metagrad.run import csv_histories
from ..metagrad.train import History
from ..plots import BandPanel, band_panels, band_plot, bar_plot, line_plot, smooth
from .adapt_eval import adapting_curves
from .atari_eval import AtariEvaluation, evaluate_agents
from .compare import ADAPTING, Comparison, LifetimeCurves, compare, mean_cells
from .epg_eval import EpgEvaluation, evaluate_loss_curves, load_loss
from .promotion import promote_version
from .report import METHOD_LABELS, VARIANT_LABELS, render_report

log = logging.getLogger(__name__)

EPG_METRICS = ("mean", "ci_low", "ci_high", "lifetimes", "nonfinite_lifetimes")  # per split and method
ATARI_METRICS = ("mean_score", "ci_low", "ci_high", "hns", "gamma", "lambda")  # per game and variant


@dataclass(frozen=True)
class EvaluatePaths:
    """Inputs and outputs of the stage, all under one root (the project root under DVC)."""

    tasks: Path
    scores: Path
    metagrad_models: Path
    metrics_dir: Path
    plots_dir: Path
    reports_dir: Path
    root: Path

    @classmethod
    def under(cls, root: Path) -> EvaluatePaths:
        return cls(
            tasks=root / "data/prepared/tasks.json",
            scores=root / "data/prepared/atari_scores.json",
            metagrad_models=root / "models/metagrad",
            metrics_dir=root / "metrics",
            plots_dir=root / "plots",
            reports_dir=root / "reports",
            root=root,
        )


def discover_agents(models_dir: Path) -> dict[str, dict[str, dict[int, Path]]]:
    """``models/metagrad/<game>/<variant>/seed<k>.pt`` -> {game: {variant: {k: path}}}, baseline first."""
    agents: dict[str, dict[str, dict[int, Path]]] = {}
    for path in sorted(models_dir.glob("*/*/seed*.pt")):
        seed = path.stem.removeprefix("seed")
        if seed.isdigit():
            game, variant = path.parent.parent.name, path.parent.name
            agents.setdefault(game, {}).setdefault(variant, {})[int(seed)] = path
    order = list(VARIANT_LABELS)
    return {
        game: {
            variant: dict(sorted(seeds.items()))
            for variant, seeds in sorted(
                variants.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99
            )
        }
        for game, variants in agents.items()
    }


def current_champion(model_name: str, alias: str, root: Path) -> tuple[str, dict] | None:
    """(version, loss) holding ``alias``, or None."""
    version = registry.alias_holder(model_name, alias, root)
    if version is None:  # no registered model or no such alias yet
        return None
    return version, torch_load(registry.download_loss(f"models:/{model_name}/{version}", root))


def stage_run_ids(metrics_dir: Path) -> dict[str, str]:
    ids = {}
    for stage in ("prepare", "evolve", "metagrad"):
        path = metrics_dir / f"{stage}.json"
        if path.exists():
            ids[stage] = read_json(path).get("mlflow_run_id", "–")
    return ids


def run_evaluate(config: PipelineConfig, paths: EvaluatePaths) -> dict:
    cfg = config.evaluate
    section = section_dict(config, "evaluate")
    model_name = config.tracking.registered_model
    with tracking.StageRun(
        "evaluate", section, params_hash(section), experiment=config.tracking.experiment
    ) as run:
        commit, _ = tracking.git_state()
        results: dict = {
            "seed": config.seed,
            "pipeline_run_id": tracking.pipeline_run_id(),
            "git_commit": commit,
        }
        # ------------------------------------------------------------ evolved loss
        loss, version = load_loss(cfg.epg.loss, paths.root)
        evolve_metrics_path = paths.metrics_dir / "evolve.json"
        evolve_metrics = read_json(evolve_metrics_path) if evolve_metrics_path.exists() else {}
        if version is None:
            version = evolve_metrics.get("registered_version")
        splits = load_tasks(paths.tasks, loss["family"])
        champion = current_champion(model_name, cfg.promotion.alias, paths.root)
        extra = {}
        if champion and champion[0] != version and _compatible(champion[1], loss):
            extra["champion"] = champion[1]["phi"].float()  # same lifetimes: a paired comparison
        epg, curves = evaluate_loss_curves(loss, splits, cfg.epg, config.seed, extra)
        results["epg"] = epg
        results["comparison"], results["curves"] = compare_methods(epg, curves, splits, config, paths)
        results["loss"] = {
            "reference": cfg.epg.loss,
            "version": version,
            "generation": loss.get("generation"),
            "fitness": loss.get("fitness"),
            "generations": evolve_metrics.get("generations"),
        }
        results["promotion"] = promote(run, epg, version, champion, cfg, model_name, paths.root)
        # ------------------------------------------------------------ Atari agents
        agents = discover_agents(paths.metagrad_models)
        if agents:
            results["atari"] = evaluate_agents(
                agents, read_json(paths.scores), cfg.atari, config.seed, cfg.epg.confidence
            )
        # ------------------------------------------------------------ outputs
        if results.get("atari"):
            results["milestones"] = training_milestones(paths.plots_dir / "metagrad")
            write_atari_scores(results["atari"], results["milestones"], paths.reports_dir, config.seed)
        figures = write_plots(results, paths)
        results["figures"] = {
            title: path.relative_to(paths.reports_dir).as_posix() for title, path in figures.items()
        }
        results["run_ids"] = {**stage_run_ids(paths.metrics_dir), "evaluate": run.run_id}
        results["params"] = config.model_dump(mode="json", by_alias=True)
        report = write_text(paths.reports_dir / "report.md", render_report(report_input(results)))
        metrics = summary_metrics(results, run.run_id)
        write_json(paths.metrics_dir / "evaluate.json", metrics)
        run.log_metrics(_flat_numbers(metrics))
        run.log_artifact(report, artifact_path="report")
        for path in figures.values():
            run.log_artifact(path, artifact_path="report")
        run.log_artifact(paths.plots_dir / "evaluate", artifact_path="plots")
        log.info("report: %s", report)
        return metrics


def compare_methods(
    epg: EpgEvaluation,
    curves: dict[str, dict[str, LifetimeCurves]],
    splits: dict[str, list[dict]],
    config: PipelineConfig,
    paths: EvaluatePaths,
) -> tuple[Comparison, dict[str, dict[str, LifetimeCurves]]]:
    """Adds MAML's and the pretrained policy's curves (when listed) to the EPG methods' and compares
    them all at equal env steps (``compare``)."""
    cfg, inner_steps, ceiling = config.evaluate.epg, None, None
    if any(method in cfg.methods for method in ADAPTING):
        policies = {
            "maml": paths.root / cfg.maml_policy,
            "pretrained": paths.root / cfg.pretrained_policy,
        }
        adapting, inner_steps, ceiling = adapting_curves(
            policies, epg.family, splits, cfg, epg.env_steps_per_lifetime, config.seed
        )
        curves = {split: {**curves[split], **adapting[split]} for split in curves}
    order = list(METHOD_LABELS)
    curves = {
        split: dict(sorted(methods.items(), key=lambda kv: order.index(kv[0])))
        for split, methods in curves.items()
    }
    comparison = compare(curves, epg.env_steps_per_lifetime, inner_steps, cfg.confidence, ceiling)
    return comparison, curves


def _compatible(a: dict, b: dict) -> bool:
    return (
        a.get("family") == b.get("family")
        and a.get("input_dim") == b.get("input_dim")
        and (a.get("loss_net") == b.get("loss_net"))
    )


def promote(run, epg: EpgEvaluation, version: str | None, champion, cfg, model_name: str, root: Path) -> dict:
    """Tag the evaluated version with its returns; move the alias only if its held-out return is better."""
    heldout, ood = epg.mean_return("test", "evolved"), epg.mean_return("ood", "evolved")
    if champion is None or champion[0] == version:
        champion_return = None
        champion_version = champion[0] if champion else None
    else:
        champion_version = champion[0]
        if "champion" in epg.splits.get("test", {}):  # evaluated on the very same lifetimes
            champion_return = epg.mean_return("test", "champion")
        else:  # another family or architecture: fall back to the return it was tagged with
            tagged = next(
                (
                    r["tags"]
                    for r in registry.list_versions(model_name, root)
                    if r["version"] == champion_version
                ),
                {},
            )
            champion_return = float(tagged["heldout_return"]) if "heldout_return" in tagged else None
    outcome = {
        "version": version,
        "heldout_return": heldout,
        "ood_return": ood,
        "champion_version": champion_version,
        "champion_heldout_return": champion_return,
        "promoted": False,
        "alias": cfg.promotion.alias,
    }
    if version is None:
        outcome["summary"] = "the evaluated loss is not a registry version; nothing to promote"
        return outcome
    registry.set_version_tags(
        model_name,
        version,
        {"heldout_return": f"{heldout:.6g}", "ood_return": f"{ood:.6g}", "evaluate_run_id": run.run_id},
        root,
    )
    if not cfg.promotion.enabled:
        outcome["summary"] = f"version {version} tagged with its returns; promotion is disabled"
        return outcome
    if champion is not None and champion[0] == version:
        outcome["promoted"] = True
        outcome["summary"] = f"version {version} already holds alias {cfg.promotion.alias!r}"
        return outcome
    decision = promote_version(model_name, version, cfg.promotion.alias, heldout, champion_return, root)
    outcome["promoted"] = decision.promote
    verb = "moved to" if decision.promote else "stays off"
    outcome["summary"] = f"alias {cfg.promotion.alias!r} {verb} version {version}: {decision.reason}" + (
        f" (champion was version {champion_version})" if champion_version else ""
    )
    run.set_tags({"promotion.decision": outcome["summary"], "promotion.promoted": decision.promote})
    log.info(outcome["summary"])
    return outcome


def write_plots(results: dict, paths: EvaluatePaths) -> dict[str, Path]:
    """CSV series for DVC plots and PNGs for the report (offline: no CDN needed)."""
    figures: dict[str, Path] = {}
    plots, reports = paths.plots_dir / "evaluate", paths.reports_dir
    comparison: Comparison = results["comparison"]
    for split, methods in results["curves"].items():
        figures[f"Return vs env steps, {split} tasks"] = curve_plots(
            methods, comparison.confidence, results["epg"].family, split, plots, reports
        )
    fitness_csv = paths.plots_dir / "evolve/fitness.csv"
    if fitness_csv.exists():
        rows = read_csv(fitness_csv)
        generations = [int(r["generation"]) for r in rows]
        figures["EPG fitness over generations"] = line_plot(
            reports / "fitness.png",
            {
                name: (generations, [float(r[name]) for r in rows])
                for name in ("mean", "center", "best_so_far")
            },
            xlabel="generation",
            ylabel="fitness",
            title="EPG: fitness of the evolved loss",
        )
    if results.get("atari"):
        figures.update(write_atari_plots(results["atari"], paths))
    return figures


def curve_plots(
    curves: dict[str, LifetimeCurves], confidence: float, family: str, split: str, plots: Path, reports: Path
) -> Path:
    """One split's curves of every method: a CSV on the union of their env-step points (each method's
    value at its latest point at or before) and a figure with CI bands at each method's own points."""
    cells = {method: mean_cells(curve, confidence) for method, curve in curves.items()}
    steps = sorted({s for curve in curves.values() for s in curve.env_steps})
    rows = []
    for step in steps:
        row: dict = {"env_steps": step}
        for method, curve in curves.items():
            index = curve.index_at(step)
            cell = cells[method][index] if index is not None else None
            for key in ("mean", "low", "high"):
                row[f"{method}_{key}"] = getattr(cell, key) if cell else ""
        rows.append(row)
    write_csv(plots / f"curves_{split}.csv", rows)
    label = lambda method: METHOD_LABELS.get(method, method)  # noqa: E731
    return line_plot(
        reports / f"curves_{split}.png",
        {label(m): (c.env_steps, [x.mean for x in cells[m]]) for m, c in curves.items()},
        bands={label(m): ([x.low for x in cells[m]], [x.high for x in cells[m]]) for m in curves},
        xlabel="env steps trained on (per lifetime)",
        ylabel=f"episode return, mean and {100 * confidence:.0f} % CI over lifetimes",
        title=f"{family}: return vs env steps ({split} tasks)",
    )


def report_input(results: dict) -> dict:
    """``results`` as the report reads them: the Atari part in its JSON layout."""
    atari = results.get("atari")
    if not atari:
        return results
    return {**results, "atari": {**atari.to_dict(), "milestones": results.get("milestones", {})}}


def training_milestones(metagrad_plots: Path) -> dict:
    """``{game: {variant: {seed: milestones}}}`` of every cell whose curves the metagrad stage wrote:
    frames to +10 and +18, when gamma and lambda settled, the return per million frames."""
    return {
        game: {
            variant: {str(seed): cell_milestones(h).to_dict() for seed, h in seeds.items()}
            for variant, seeds in variants.items()
        }
        for game, variants in csv_histories(metagrad_plots).items()
    }


def write_atari_scores(atari: AtariEvaluation, milestones: dict, reports: Path, seed: int) -> None:
    """``atari_scores.json``: every agent's episodes (the layout of ``python -m pipeline score --out``);
    ``seeds_<game>.json``: each agent's mean score and CI with its cell's training milestones, the
    source of the README's Pong table."""
    write_json(reports / "atari_scores.json", {**atari.to_dict(), "seed": seed})
    for game in atari.games:
        write_json(reports / f"seeds_{game}.json", atari.per_seed_scores(game, milestones.get(game)))


def write_atari_plots(atari: AtariEvaluation, paths: EvaluatePaths) -> dict[str, Path]:
    """HNS per game and variant with CIs over seeds; training curves with one line per variant and a
    band over seeds (from the metagrad stage's per-cell CSVs)."""
    figures: dict[str, Path] = {}
    rows = [
        {
            "game": game,
            "variant": variant,
            "seeds": row.num_seeds,
            "mean_score": row.mean_score,
            "hns": row.hns,
            "hns_ci_low": row.hns_ci_low,
            "hns_ci_high": row.hns_ci_high,
        }
        for game, variants in atari.games.items()
        for variant, row in variants.items()
    ]
    write_csv(paths.plots_dir / "evaluate/hns.csv", rows)
    label = lambda variant: VARIANT_LABELS.get(variant, variant)  # noqa: E731
    figures["Human-normalised score per game and variant"] = bar_plot(
        paths.reports_dir / "hns.png",
        {
            game: {label(v): 100 * r.hns for v, r in variants.items()}
            for game, variants in atari.games.items()
        },
        errors={
            game: {label(v): (100 * r.hns_ci_low, 100 * r.hns_ci_high) for v, r in variants.items()}
            for game, variants in atari.games.items()
        },
        ylabel="human-normalised score (%), CI over seeds",
        title="No-op-start evaluation",
    )
    histories = csv_histories(paths.plots_dir / "metagrad")
    for game in atari.games:
        scores = atari.reference_scores[game]
        references = {"random": scores["random"], "human": scores["human"]}  # on the return panel
        panels = []
        for kind, column, ylabel in (
            ("returns", "episode_return", "raw episode return (moving avg of 10)"),
            ("eta", "gamma", "gamma"),
            ("eta", "lambda", "lambda"),
        ):
            curves = training_curves(histories.get(game, {}), column)
            if curves:
                name = "return" if kind == "returns" else column
                curves = {label(v): seeds for v, seeds in curves.items()}
                figures[f"{game}: {name} during training"] = band_plot(
                    paths.reports_dir / f"{name}_{game}.png",
                    curves,
                    xlabel="frames",
                    ylabel=ylabel,
                    title=f"{game}: {name} vs frames, one line per variant, band over seeds",
                )
                panels.append(BandPanel(curves, ylabel, references if kind == "returns" else None))
        if len(panels) == 3:  # the one figure of a game's training: return, gamma and lambda
            seeds = max(len(per_seed) for per_seed in panels[0].curves.values())
            figures[f"{game}: training"] = band_panels(
                paths.reports_dir / f"training_{game}.png",
                panels,
                xlabel="frames",
                title=f"{game}: one line per variant (mean over {seeds} seeds), band = min to max over seeds",
            )
    return figures


def training_curves(cells: dict[str, dict[int, History]], column: str) -> dict[str, list[tuple[list, list]]]:
    """One game's cells -> {variant: [(frames, values) per seed]}: the return (moving average of 10
    games) by episode frames, or gamma or lambda by update frames."""
    order = list(VARIANT_LABELS)
    curves: dict[str, list[tuple[list, list]]] = {}
    for variant in sorted(cells, key=order.index):
        for h in cells[variant].values():
            if column == "episode_return":
                curve = (h.episode_frames, smooth(h.episode_returns, 10))
            else:
                curve = (h.update_frames, h.gammas if column == "gamma" else h.lambdas)
            curves.setdefault(variant, []).append(curve)
    return curves


def summary_metrics(results: dict, run_id: str) -> dict:
    """The DVC metrics: final returns with CIs, per-game scores and HNS, median HNS, promotion."""
    metrics: dict = {"epg": {}}
    for split, methods in results["epg"].splits.items():
        metrics["epg"][split] = {
            method: {
                k: getattr(summary, k)
                for k in ("mean", "ci_low", "ci_high", "lifetimes", "nonfinite_lifetimes")
            }
            for method, summary in methods.items()
        }
    if "comparison" in results:
        metrics["comparison"] = results["comparison"].to_dict()
    atari = results.get("atari")
    if atari:
        metrics["atari"] = {
            game: {variant: summary.metrics() for variant, summary in variants.items()}
            for game, variants in atari.games.items()
        }
        metrics["median_hns"] = {variant: agg["median"] for variant, agg in atari.hns.items()}
        metrics["mean_hns"] = {variant: agg["mean"] for variant, agg in atari.hns.items()}
    metrics["promotion"] = {k: v for k, v in results["promotion"].items()}
    metrics["mlflow_run_id"] = run_id
    return metrics


def _flat_numbers(data: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{name}."))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)) and value is not None:
            flat[name] = float(value)
    return flat
