"""The README's results tables quote committed JSON: every number there must equal its source, rounded.

A rerun that changes ``docs/results/compare/evaluate.json`` without the README (or a hand edit of either)
fails here, so a reader can trust the front page as much as the JSON it links to.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMPARE_JSON = ROOT / "docs" / "results" / "compare" / "evaluate.json"

METHOD_COLUMNS = {  # README header -> comparison row
    "evolved loss (EPG)": "evolved",
    "PPO": "ppo",
    "vanilla PG": "pg",
    "MAML θ₀ + PG": "maml",
    "pretrained + PG": "pretrained",
}
SPLITS = {"held-out": "test", "OOD": "ood"}
INTERVAL = re.compile(r"^\**(-?[\d.]+)\**\s*\[(-?[\d.]+),\s*(-?[\d.]+)\]$")


def markdown_table(text: str, header_starts: str) -> tuple[list[str], list[list[str]]]:
    """The first table whose header row starts with ``header_starts``: (header cells, body rows)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_starts):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([cell.strip() for cell in body.strip("|").split("|")])
            return header, rows
    raise AssertionError(f"README.md has no table starting {header_starts!r}")


def parse_interval(cell: str) -> tuple[float, float, float]:
    match = INTERVAL.match(cell)
    assert match, f"README cell {cell!r} is not 'mean [low, high]'"
    return tuple(float(group) for group in match.groups())


def column_key(at: str, columns: dict[str, int]) -> str:
    """README's "at" cell (K or a step count such as "16 384") -> the comparison's column name."""
    if at == "K":
        return next(name for name in columns if name.startswith("K"))
    steps = int(at.replace(" ", ""))
    names = [name for name, value in columns.items() if value == steps and not name.startswith("K")]
    assert names, f"README row at {at!r} steps: no such column in {COMPARE_JSON.name} ({columns})"
    return names[0]


def test_compare_table_quotes_the_committed_evaluation():
    comparison = json.loads(COMPARE_JSON.read_text())["comparison"]
    header, rows = markdown_table(README.read_text(), "| split | at |")
    methods = [METHOD_COLUMNS[name] for name in header[2:]]
    assert len(rows) == 4, "the table has held-out and OOD rows at K and at the end"
    checked = 0
    for split_name, at, *cells in rows:
        split = comparison["splits"][SPLITS[split_name]]
        column = column_key(at, split["columns"])
        for method, cell in zip(methods, cells, strict=True):
            stats = split["rows"][method]["returns"][column]
            quoted = parse_interval(cell)
            source = (stats["mean"], stats["low"], stats["high"])
            for shown, value in zip(quoted, source, strict=True):
                assert shown == round(value, 1), (
                    f"README {split_name} at {at}, {method}: shows {cell}, "
                    f"{COMPARE_JSON.relative_to(ROOT)} has {value:.3f}"
                )
            checked += 1
    assert checked == 20


def test_compare_table_bolds_the_best_method():
    comparison = json.loads(COMPARE_JSON.read_text())["comparison"]
    header, rows = markdown_table(README.read_text(), "| split | at |")
    methods = [METHOD_COLUMNS[name] for name in header[2:]]
    for split_name, at, *cells in rows:
        split = comparison["splits"][SPLITS[split_name]]
        bold = [method for method, cell in zip(methods, cells, strict=True) if cell.startswith("**")]
        assert bold == [split["best"][column_key(at, split["columns"])]], (split_name, at, bold)


def signed(text: str) -> float:
    return float(text.replace("**", "").replace("+", "").replace("−", "-"))


SEEDS_JSON = ROOT / "docs" / "results" / "pong_seeds.json"
PAIRED_JSON = ROOT / "docs" / "results" / "pong_seeds" / "atari_scores.json"


def millions(frames: int | None) -> str:
    return "–" if frames is None else f"{frames / 1e6:g} M"


def quoted_interval(cell: str) -> tuple[float, float, float]:
    return parse_interval(cell.replace("+", "").replace("−", "-"))


def test_pong_seed_table_quotes_the_committed_evaluation():
    """README's "| seed | {} final agent" table: each agent's score and CI, the paired difference per
    seed and its mean with CI, the seed means, frames to +10 / +18: all from docs/results/pong_seeds.json
    and the evaluate stage's atari_scores.json beside it."""
    seeds = json.loads(SEEDS_JSON.read_text())
    pong = json.loads(PAIRED_JSON.read_text())["games"]["pong"]
    diff = pong["gamma_lambda"]["diff_vs_impala"]
    _, rows = markdown_table(README.read_text(), "| seed | {} final agent")
    assert [row[0] for row in rows] == ["0", "1", "2", "mean over seeds"]
    for seed, base, meta, difference, base_marks, meta_marks in rows[:3]:
        for cell, variant in ((base, "impala"), (meta, "gamma_lambda")):
            entry = seeds[variant][seed]
            assert entry["episodes"] == 30 and entry["frames"] == 10_000_000
            expected = tuple(round(entry[k], 2) for k in ("mean", "ci_low", "ci_high"))
            assert quoted_interval(cell) == expected, (seed, variant, cell)
        assert signed(difference) == round(diff["per_seed"][seed], 2), (seed, difference)
        for marks, variant in ((base_marks, "impala"), (meta_marks, "gamma_lambda")):
            reach = seeds[variant][seed]["training"]["frames_to_return"]
            assert marks == f"{millions(reach['10'])} / {millions(reach['18'])}", (seed, variant, marks)
    _, base, meta, difference, *_ = rows[3]
    for cell, variant in ((base, "impala"), (meta, "gamma_lambda")):
        expected = tuple(round(pong[variant][k], 2) for k in ("mean_score", "ci_low", "ci_high"))
        assert quoted_interval(cell) == expected, (variant, cell)
    assert quoted_interval(difference) == tuple(round(diff[k], 2) for k in ("mean", "ci_low", "ci_high"))
