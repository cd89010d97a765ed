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


# the phrase that follows a profile's scores in the README -> its results folder
PONG_PROFILES = {
    "with 32 envs": "pong_lr0.0012_entropy0.01_envs32",
}


def test_pong_paragraph_quotes_each_profiles_committed_seed_scores():
    """'+18.17, +17.87, +15.90 over 30 ... on seeds 0–2 with 32 envs': each profile's three {} scores, in
    seed order, are its committed ``pong_seeds.json``."""
    paragraph = next(p for p in README.read_text().split("\n\n") if p.startswith("Pong (learn profile"))
    for phrase, folder in PONG_PROFILES.items():
        seeds = json.loads((ROOT / "docs" / "results" / folder / "pong_seeds.json").read_text())["impala"]
        assert folder in paragraph
        expected = [round(seeds[s]["mean"], 2) for s in sorted(seeds, key=int)]
        before = paragraph.split(phrase)[0]
        quoted = [signed(x) for x in re.findall(r"(?:\*\*)?[+−-]\d+\.\d\d(?:\*\*)?", before)[-3:]]
        assert quoted == expected, (phrase, quoted, expected)
