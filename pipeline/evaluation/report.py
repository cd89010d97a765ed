"""The one-page markdown report of the evaluate stage (tables, figures, params, seeds, run ids)."""

from __future__ import annotations

import math

import yaml

from ..config import EPG_METHODS, METAGRAD_VARIANTS, variant_label

METHOD_LABELS = {**EPG_METHODS, "champion": "registry champion loss"}
VARIANT_LABELS = {variant: variant_label(variant) for variant in METAGRAD_VARIANTS}


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def render_report(results: dict) -> str:
    """Markdown for ``results`` as assembled by the evaluate stage (see ``evaluation.run``)."""
    epg, atari = results.get("epg"), results.get("atari")
    lines = ["# Evaluation report", ""]
    lines += [
        f"Pipeline run `{results.get('pipeline_run_id', '–')}`, seed {results.get('seed', '–')}, "
        f"git commit `{results.get('git_commit', '–')}`.",
        "",
    ]
    if epg:
        loss = results.get("loss", {})
        lines += [
            "## Evolved loss on held-out and out-of-distribution tasks",
            "",
            f"Loss `{loss.get('reference', '–')}` (registry version {loss.get('version', '–')}, family "
            f"`{epg.family}`, evolved for {loss.get('generations', '–')} generations, best center fitness "
            f"{_num(loss.get('fitness'))} at generation {loss.get('generation', '–')}). Each method trains "
            f"fresh policies for {epg.env_steps_per_lifetime} env steps on every (task, seed) pair: "
            f"{epg.seeds} seeds × "
            f"{', '.join(f'{n} {s}' for s, n in epg.tasks_per_split.items())} tasks. "
            "Returns are the mean of the post-training episodes; intervals are 95 % Student-t CIs over "
            "lifetimes.",
            "",
        ]
        rows = []
        for split, methods in epg.splits.items():
            for method, summary in methods.items():
                rows.append(
                    [
                        split,
                        METHOD_LABELS.get(method, method),
                        _num(summary.mean),
                        f"[{_num(summary.ci_low)}, {_num(summary.ci_high)}]",
                        str(summary.lifetimes),
                        str(summary.nonfinite_lifetimes),
                    ]
                )
        lines += _table(["split", "method", "mean final return", "95 % CI", "lifetimes", "non-finite"], rows)
        lines.append("")
    promotion = results.get("promotion")
    if promotion:
        lines += ["### Registry promotion", "", f"- {promotion['summary']}", ""]
    if atari:
        lines += [
            "## Meta-gradient agents on Atari (no-op starts)",
            "",
            "Raw game scores over no-op-start episodes (1–30 no-ops, 108 000-frame cap, actions sampled "
            "from the policy); HNS = (agent − random) / (human − random) from the Atari-57 table.",
            "",
        ]
        rows = []
        for game, variants in atari.games.items():
            for variant, row in variants.items():
                rows.append(
                    [
                        game,
                        VARIANT_LABELS.get(variant, variant),
                        f"{_num(row.mean_score, 1)} [{_num(row.ci_low, 1)}, {_num(row.ci_high, 1)}]",
                        f"{100 * row.hns:.1f} %",
                        _num(row.gamma, 4),
                        _num(row.lambda_, 3),
                        f"{row.train_frames:,}",
                        str(len(row.scores)),
                    ]
                )
        lines += _table(
            ["game", "variant", "mean raw score [95 % CI]", "HNS", "γ", "λ", "training frames", "episodes"],
            rows,
        )
        lines += ["", "Median human-normalised score per variant:", ""]
        rows = [
            [
                VARIANT_LABELS.get(variant, variant),
                f"{100 * agg['median']:.1f} % over {agg['games']} game(s)",
                f"{atari.paper_median_hns_percent.get(variant, math.nan):.1f} %",
            ]
            for variant, agg in atari.hns.items()
        ]
        lines += _table(["variant", "ours (this run)", "paper: 57 games, 200M frames (reference only)"], rows)
        lines += [
            "",
            "The paper column is Xu, van Hasselt & Silver (2018), Table 1 (no-op starts, γ̄ = 0.99): numbers "
            "from 200 M frames on 57 games, shown for reference; they are **not** produced by this run.",
            "",
        ]
    figures = results.get("figures", {})
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures.items():
            lines += [f"**{title}**", "", f"![{title}]({path})", ""]
    run_ids = results.get("run_ids", {})
    if run_ids:
        lines += ["## MLflow runs", ""]
        lines += _table(["stage", "run id"], [[stage, f"`{rid}`"] for stage, rid in run_ids.items()])
        lines.append("")
    if results.get("params"):
        lines += [
            "## Params used",
            "",
            "```yaml",
            yaml.safe_dump(results["params"], sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)
