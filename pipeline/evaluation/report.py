"""The one-page markdown report of the evaluate stage (tables, figures, params, seeds, run ids)."""

from __future__ import annotations

import math

import yaml

from ..config import EPG_METHODS, METAGRAD_VARIANTS, variant_label
from ..metagrad.milestones import RETURN_THRESHOLDS

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
        lines += epg_section(epg, results.get("loss", {}))
    if results.get("comparison"):
        lines += comparison_section(results["comparison"])
    promotion = results.get("promotion")
    if promotion:
        lines += ["### Registry promotion", "", f"- {promotion['summary']}", ""]
    if atari:
        lines += atari_section(atari)
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


CLAIMS = {
    "a": "(a) EPG's evolved loss trains fresh policies faster than PPO on held-out tasks "
    "(Houthooft et al. 2018).",
    "b": "(b) Out of distribution, EPG's loss keeps learning where MAML's adaptation does not "
    "(EPG paper, GoalAnt with the goal behind the agent).",
}


def _beyond_evolved_lifetime(epg) -> str:
    if epg.evolved_lifetime_steps == epg.env_steps_per_lifetime:
        return ""
    return (
        f" (the loss was evolved with {epg.evolved_lifetime_steps}-step lifetimes; "
        "`evaluate.epg.lifetime_steps` sets the evaluation's)"
    )


def epg_section(epg, loss: dict) -> list[str]:
    """The post-training returns of the EPG methods (the loss networks, PPO and PG) per split."""
    lines = [
        "## Evolved loss on held-out and out-of-distribution tasks",
        "",
        f"Loss `{loss.get('reference', '–')}` (registry version {loss.get('version', '–')}, family "
        f"`{epg.family}`, evolved for {loss.get('generations', '–')} generations, best center fitness "
        f"{_num(loss.get('fitness'))} at generation {loss.get('generation', '–')}). Each method trains "
        f"fresh policies for {epg.env_steps_per_lifetime} env steps on every (task, seed) pair"
        f"{_beyond_evolved_lifetime(epg)}: "
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
    return lines


def comparison_section(comparison) -> list[str]:
    """Per split: return at equal env steps (1 and K adaptation steps' worth, mid, end of the budget),
    env steps to reach PPO's final return, learns-or-not; then the two claims' verdicts."""
    level = f"{100 * comparison.confidence:.0f} %"
    lines = [
        "## All methods at equal env steps",
        "",
        f"Every method trains on the same (seed, task) lifetimes for {comparison.budget} env steps. The "
        "x-axis counts the env steps a policy had trained on when it produced the measured episodes; a "
        "method's return at x is its latest curve point at or before x (no interpolation). Columns: "
        "the env steps MAML had used after 1 and after K inner steps, half the budget, the budget. "
        f"Cells: mean return [{level} CI] over lifetimes; * marks the best mean of a column. "
        "'steps to PPO final': the first point whose mean reaches PPO's end-of-budget mean. 'learns': "
        "the last point's CI lies above the first point's. These are returns of the episodes played "
        "while training (the learning curves), so they differ from the post-training episodes above. "
        "MAML and the pretrained policy sample `maml.rollouts_per_task` episodes of at most "
        "`maml.horizon` steps per point (params below); on cart-pole that caps their returns at the "
        "horizon.",
        "",
    ]
    for split, table in comparison.splits.items():
        header = ["method", *(f"{name} ({steps})" for name, steps in table.columns.items())]
        header += ["steps to PPO final", f"first → last point [{level} CI]", "learns"]
        rows = [
            [
                METHOD_LABELS.get(method, method),
                *(
                    _interval(c.mean, c.low, c.high) + (" *" if table.best[name] == method else "")
                    for name, c in row.returns.items()
                ),
                "not reached" if row.steps_to_ppo_final is None else str(row.steps_to_ppo_final),
                f"{_interval(row.first.mean, row.first.low, row.first.high)} → "
                f"{_interval(row.last.mean, row.last.low, row.last.high)}",
                "yes" if row.learns else "no",
            ]
            for method, row in table.rows.items()
        ]
        lines += [f"**{split} tasks** (PPO's final mean: {_num(table.ppo_final, 1)})", ""]
        lines += _table(header, rows) + [""]
    lines += ["### The published claims", ""]
    for claim in comparison.claims:
        lines += [f"- {CLAIMS[claim.claim]} Criterion: {claim.criterion}. **{claim.verdict}**."]
    return lines + [""]


def _interval(mean, low, high, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    values = [None if v is None else scale * float(v) for v in (mean, low, high)]
    return f"{_num(values[0], digits)}{unit} [{_num(values[1], digits)}, {_num(values[2], digits)}]"


def atari_section(atari: dict) -> list[str]:
    """Per game and variant over training seeds, paired differences with {}, per seed, median HNS."""
    level = f"{100 * atari.get('confidence', 0.95):.0f} %"
    lines = [
        "## Meta-gradient agents on Atari (no-op starts)",
        "",
        "Raw game scores over no-op-start episodes (each begins after fewer than `evaluate.atari.noop_max` "
        "no-op emulator frames, drawn from its seed; 108 000-frame cap; actions sampled from the "
        "policy); HNS = (agent − random) / (human − random) from the Atari-57 table. One agent "
        "per training seed; every agent plays the same seeded episodes. Means and "
        f"{level} Student-t CIs are over training seeds (a single seed has no interval).",
        "",
    ]
    header = [
        "game",
        "variant",
        f"mean raw score [{level} CI]",
        "HNS [CI]",
        "seeds",
        "mean γ",
        "mean λ",
        "frames",
    ]
    lines += _table(header, _variant_rows(atari))
    rows = _difference_rows(atari)
    if rows:
        lines += [
            "",
            "Paired difference with the baseline, per training seed (same seed, same episodes):",
            "",
        ]
        lines += _table(["game", "difference", f"mean raw score difference [{level} CI]", "seeds"], rows)
    lines += ["", f"Per training seed ({level} CI over episodes):", ""]
    header = ["game", "variant", "seed", "mean raw score [CI]", "HNS", "γ", "λ", "episodes"]
    header += [
        "training return " + " / ".join(f"≥ {t:g}" for t in RETURN_THRESHOLDS) + " by",
        "γ / λ settled at",
    ]
    lines += _table(header, _seed_rows(atari))
    lines += [
        "",
        "Training milestones: the end of the first million-frame window whose finished training games "
        "average at least the return; γ and λ settle where they stay within 5 % of their travel of the "
        "final value (`pipeline/metagrad/milestones.py`).",
    ]
    lines += ["", "Median human-normalised score over games per variant (seed-mean HNS per game):", ""]
    rows = [
        [
            VARIANT_LABELS.get(variant, variant),
            f"{100 * agg['median']:.1f} % over {agg['games']} game(s)",
            f"{atari['paper_median_hns_percent'].get(variant, math.nan):.1f} %",
        ]
        for variant, agg in atari["hns"].items()
    ]
    lines += _table(["variant", "ours (this run)", "paper: 57 games, 200M frames (reference only)"], rows)
    lines += [
        "",
        "The paper column is Xu, van Hasselt & Silver (2018), Table 1 (no-op starts, γ̄ = 0.99): numbers "
        "from 200 M frames on 57 games, shown for reference; they are **not** produced by this run.",
        "",
    ]
    return lines


def _variant_rows(atari: dict) -> list[list[str]]:
    return [
        [
            game,
            VARIANT_LABELS.get(variant, variant),
            _interval(row["mean_score"], row["ci_low"], row["ci_high"]),
            _interval(row["hns"], row["hns_ci_low"], row["hns_ci_high"], scale=100, unit=" %"),
            str(row["num_seeds"]),
            _num(row["gamma"], 4),
            _num(row["lambda"], 3),
            f"{row['train_frames']:,}",
        ]
        for game, variants in atari["games"].items()
        for variant, row in variants.items()
    ]


def _difference_rows(atari: dict) -> list[list[str]]:
    return [
        [
            game,
            f"{VARIANT_LABELS.get(variant, variant)} − {VARIANT_LABELS['impala']}",
            _interval(diff["mean"], diff["ci_low"], diff["ci_high"]),
            str(diff["seeds"]),
        ]
        for game, variants in atari["games"].items()
        for variant, row in variants.items()
        if (diff := row.get("diff_vs_impala"))
    ]


def _seed_rows(atari: dict) -> list[list[str]]:
    milestones = atari.get("milestones", {})
    return [
        [
            game,
            VARIANT_LABELS.get(variant, variant),
            seed,
            _interval(cell["mean_score"], cell["ci_low"], cell["ci_high"]),
            f"{100 * cell['hns']:.1f} %",
            _num(cell["gamma"], 4),
            _num(cell["lambda"], 3),
            str(len(cell["scores"])),
            *_milestone_cells(
                milestones.get(game, {}).get(variant, {}).get(seed), METAGRAD_VARIANTS.get(variant)
            ),
        ]
        for game, variants in atari["games"].items()
        for variant, row in variants.items()
        for seed, cell in row["seeds"].items()
    ]


def _milestone_cells(m: dict | None, learned: tuple[str, ...] | None = None) -> list[str]:
    """ "6 M / not reached" and "0.2 M / 8.8 M" for a cell's milestones; dashes without its curves.
    A parameter the variant does not meta-learn (``learned``: its names) reads "fixed", not "settled at
    once"."""
    if not m:
        return ["–", "–"]
    frames = lambda f, missing: missing if f is None else f"{f / 1e6:.3g} M"  # noqa: E731
    reached = " / ".join(frames(f, "not reached") for f in m["frames_to_return"].values())
    settled = " / ".join(
        "fixed" if learned is not None and name not in learned else frames(m[f"{name}_settled_at"], "–")
        for name in ("gamma", "lambda")
    )
    return [reached, settled]
