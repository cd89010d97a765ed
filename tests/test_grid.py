"""Tests of the metagrad grid: cells and their seeds, the config, the evaluation over seeds (the two-node
Ray cluster: test_grid_cluster.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from grid_helpers import assert_same_agent, tiny_config, write_params

from pipeline.config import ConfigError, load_params
from pipeline.evaluation.atari_eval import AgentScore, paired_difference, summarize_seeds
from pipeline.evaluation.run import discover_agents
from pipeline.io import torch_load
from pipeline.metagrad import grid
from pipeline.metagrad.grid import Cell, cell_config, grid_cells, train_cell
from pipeline.metagrad.train import train_variant
from pipeline.seeding import variant_seed

# Serial cells run with the torch threads of a Ray cell (cpus_per_cell = 1): same bits.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------- config
def test_seeds_default_to_the_top_level_seed(tmp_path):
    """A params file without metagrad.seeds trains the top-level seed, as the stage did before seeds."""
    config = load_params(write_params(tmp_path / "p.yaml", {}, seed=7, drop=("seeds",)))
    assert config.metagrad.seeds == [7]
    config = load_params(write_params(tmp_path / "p.yaml", {"seeds": [0, 3]}, seed=7))
    assert config.metagrad.seeds == [0, 3]


@pytest.mark.parametrize(
    ("metagrad", "expected"),
    [
        ({"ray": {"concurrent_cels": 2}}, "metagrad.ray.concurrent_cels: unknown key; allowed here: "),
        ({"ray": {"concurrent_cells": 0}}, "metagrad.ray.concurrent_cells = 0: "),
        ({"ray": {"gpus_per_cell": -1}}, "metagrad.ray.gpus_per_cell = -1: "),
        ({"seeds": [1, 1]}, "metagrad.seeds = [1, 1]: seeds are listed more than once"),
        ({"seeds": []}, "metagrad.seeds = []: "),
        ({"seeds": [-1]}, "metagrad.seeds.0 = -1: "),
    ],
)
def test_bad_grid_params_give_one_line_naming_the_key(tmp_path, metagrad, expected):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path / "p.yaml", metagrad))
    assert len(error.value.lines) == 1 and expected in error.value.lines[0], error.value.lines


# --------------------------------------------------------------------------------------------- cells
def test_cells_cover_the_grid_and_keep_the_seed_rule(tmp_path):
    config = tiny_config()
    cells = grid_cells(config)
    assert [c.key for c in cells] == [
        "pong/impala/seed0",
        "pong/gamma_lambda/seed0",
        "pong/impala/seed1",
        "pong/gamma_lambda/seed1",
    ]
    cell = cells[3]
    assert cell.training_seed == variant_seed(1, "pong") == Cell("pong", "impala", 1).training_seed
    assert cell.path_under(tmp_path) == tmp_path / "pong/gamma_lambda/seed1.pt"
    assert cell.tags() == {"game": "pong", "variant": "gamma_lambda", "seed": "1"}
    one = cell_config(config.model_copy(update={"seeds": [0, 1, 5], "games": ["pong", "breakout"]}), cell)
    assert one == cell_config(config, cell)  # growing the grid keeps a cell's checkpoint valid


def test_a_meta_learner_sweep_keeps_the_baseline_cells(tmp_path):
    """{} learns no eta, so its cell config ignores metagrad.meta (but the embedding's size): a sweep of
    the meta lr reuses the {} checkpoints. Justified by the numbers: {} trained under two different
    meta-learners gives the same agent bit for bit."""
    config = tiny_config(frames=3 * 40)
    meta = config.meta.model_copy(update={"lr": 0.5, "objective": "value_error", "init_gamma": 0.9})
    other = config.model_copy(update={"meta": meta})
    baseline, meta_learner = Cell("pong", "impala", 0), Cell("pong", "gamma_lambda", 0)
    assert cell_config(other, baseline) == cell_config(config, baseline)
    assert cell_config(other, meta_learner) != cell_config(config, meta_learner)
    wider = other.model_copy(update={"meta": other.meta.model_copy(update={"embedding_dim": 8})})
    assert cell_config(wider, baseline) != cell_config(config, baseline)
    agents = [
        train_variant(c, "pong", "impala", baseline.training_seed, tmp_path / f"{i}.pt")[1].net.state_dict()
        for i, c in enumerate((config, other))  # the raw configs, not cell_config's
    ]
    assert_same_agent(*agents)


def test_ray_is_used_for_concurrent_cells_or_a_cluster_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not grid.uses_ray(tiny_config().ray)
    assert grid.uses_ray(tiny_config(ray={"concurrent_cells": 2}).ray)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert grid.uses_ray(tiny_config().ray)


def test_serial_grid_trains_each_cell_as_train_variant_does(serial_grid, tmp_path):
    outcomes, logged = serial_grid["outcomes"], serial_grid["logged"]
    assert list(outcomes) == [c.key for c in grid_cells(tiny_config())]
    for key, outcome in outcomes.items():
        assert (outcome.result.frames, outcome.result.updates, outcome.resumed_at_frames) == (240, 6, 0)
        assert [step for step, _ in logged[key]["steps"]] == outcome.result.history.update_frames
        assert "episode_return" in {name for _, m in logged[key]["steps"] for name in m} or not (
            outcome.result.history.episode_returns
        )
    # seed 0 of the grid is the stage's single-seed run of seed 0: same derivation, same bits
    cell = Cell("pong", "gamma_lambda", 0)
    direct, learner = train_variant(
        cell_config(tiny_config(), cell), "pong", "gamma_lambda", variant_seed(0, "pong"), tmp_path / "c.pt"
    )
    assert direct.history == outcomes[cell.key].result.history
    assert_same_agent(outcomes[cell.key].model, learner.net.state_dict())
    # another seed, another agent
    seed0, seed1 = (torch_load(outcomes[f"pong/impala/seed{k}"].model)["state_dict"] for k in (0, 1))
    assert any(not torch.equal(seed0[name], seed1[name]) for name in seed0)


def test_a_finished_cell_is_not_trained_again(serial_grid, tmp_path):
    config = tiny_config(seeds=[0], variants=["impala"])
    cell = grid_cells(config)[0]
    first = train_cell(config, cell, tmp_path)
    again = train_cell(config, cell, tmp_path)
    assert again.resumed_at_frames == first.result.frames == 240
    assert again.result.history == first.result.history == serial_grid["outcomes"][cell.key].result.history


def test_cells_are_child_runs_of_the_stage_run_and_a_resumed_cell_continues_its_own(tmp_path, monkeypatch):
    import mlflow

    from pipeline.tracking import ChildRun, StageRun, client

    (tmp_path / "dvc.yaml").touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_RUN_ID", "test-grid")
    cell, other = Cell("pong", "gamma_lambda", 1), Cell("pong", "impala", 1)
    try:
        with StageRun("metagrad", {}, "h", experiment="grid-test") as stage:
            with ChildRun(stage, cell.key, cell.tags()) as first:
                first.queue_metrics({"episode_return": 1.0, "gamma": float("nan")}, step=40)
            with ChildRun(stage, cell.key, cell.tags()) as again:  # the cell resumed
                again.queue_metrics({"episode_return": 2.0}, step=80)
            with ChildRun(stage, other.key, other.tags()) as sibling:
                pass
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    assert again.run_id == first.run_id != sibling.run_id
    run = client().get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pong/gamma_lambda/seed1"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == stage.run_id
    assert (tags["game"], tags["variant"], tags["seed"]) == ("pong", "gamma_lambda", "1")
    history = client().get_metric_history(first.run_id, "episode_return")
    assert [(m.step, m.value) for m in history] == [(40, 1.0), (80, 2.0)]
    assert "gamma" not in run.data.metrics  # not finite: dropped, as in the stage run


# --------------------------------------------------------------------------------------------- evaluation
def cell_scores(mean: float, hns: float) -> AgentScore:
    return AgentScore(
        mean_score=mean,
        ci_low=mean - 1,
        ci_high=mean + 1,
        hns=hns,
        train_frames=100,
        gamma=0.99,
        lambda_=1.0,
        scores=[mean] * 3,
        start_frames=[1, 2, 3],
        lengths=[50] * 3,
    )


def test_seed_summary_and_paired_difference_on_known_numbers():
    baseline = summarize_seeds({1: cell_scores(-20.0, 0.02), 0: cell_scores(-21.0, 0.0)}, 0.95)
    assert list(baseline.seeds) == ["0", "1"]
    assert baseline.mean_score == pytest.approx(-20.5)
    # t_{0.975, 1} = 12.706; s = 0.7071; half width = 12.706 * 0.7071 / sqrt(2) = 6.353
    assert (baseline.ci_low, baseline.ci_high) == pytest.approx((-26.853, -14.147), abs=1e-3)
    assert baseline.hns == pytest.approx(0.01) and baseline.num_seeds == 2
    learned = summarize_seeds(
        {0: cell_scores(-18.0, 0.08), 1: cell_scores(-16.0, 0.1), 2: cell_scores(0, 0)}, 0.95
    )
    diff = paired_difference(learned.seeds, baseline.seeds, 0.95)
    assert diff.per_seed == {"0": 3.0, "1": 4.0} and diff.seeds == 2  # seed 2 has no baseline
    assert diff.mean == pytest.approx(3.5)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((3.5 - 6.353, 3.5 + 6.353), abs=1e-3)


def test_atari_results_are_typed_and_serialise_to_the_former_layout():
    """The JSON of ``score --out`` and the report's input keep their keys, in their order."""
    baseline = summarize_seeds({0: cell_scores(-21.0, 0.0), 1: cell_scores(-20.0, 0.02)}, 0.95)
    learned = summarize_seeds({0: cell_scores(-18.0, 0.08), 1: cell_scores(-16.0, 0.1)}, 0.95)
    learned = replace(learned, diff_vs_impala=paired_difference(learned.seeds, baseline.seeds, 0.95))
    cell = learned.seeds["1"].to_dict()
    assert list(cell) == [
        *("mean_score", "ci_low", "ci_high", "hns", "train_frames", "gamma", "lambda"),
        *("scores", "start_frames", "lengths"),
    ]
    assert cell["lambda"] == 1.0 and cell["scores"] == [-16.0] * 3
    row = learned.to_dict()
    assert list(row) == [
        *("mean_score", "ci_low", "ci_high", "hns", "hns_ci_low", "hns_ci_high", "num_seeds", "episodes"),
        *("train_frames", "gamma", "lambda", "seeds", "diff_vs_impala"),
    ]
    assert row["seeds"]["1"] == cell and row["episodes"] == 6
    assert row["diff_vs_impala"] == {
        "mean": 3.5,
        "ci_low": learned.diff_vs_impala.ci_low,
        "ci_high": learned.diff_vs_impala.ci_high,
        "seeds": 2,
        "per_seed": {"0": 3.0, "1": 4.0},
    }
    assert "diff_vs_impala" not in baseline.to_dict()  # the baseline has no difference with itself
    assert list(learned.metrics()) == [
        *("mean_score", "ci_low", "ci_high", "hns", "hns_ci_low", "hns_ci_high", "num_seeds"),
        "diff_vs_impala",
    ]
    assert list(learned.metrics()["diff_vs_impala"]) == ["mean", "ci_low", "ci_high"]


def test_agents_are_discovered_per_game_variant_and_seed(tmp_path):
    for relative in (
        "pong/gamma_lambda/seed1.pt",
        "pong/impala/seed1.pt",
        "pong/impala/seed0.pt",
        "pong/x.pt",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    agents = discover_agents(tmp_path)
    assert list(agents["pong"]) == ["impala", "gamma_lambda"]  # baseline first
    assert agents["pong"]["impala"] == {
        0: tmp_path / "pong/impala/seed0.pt",
        1: tmp_path / "pong/impala/seed1.pt",
    }


def test_evaluate_scores_every_cell_and_plots_a_band_per_variant(serial_grid, tmp_path):
    """The grid's 4 agents, played and summarised as the evaluate stage does: per game and variant
    over seeds, the paired difference with {}, the median HNS, per-seed rows; plots with seed bands."""
    from pipeline.config import AtariEvalConfig
    from pipeline.evaluation.atari_eval import evaluate_agents
    from pipeline.evaluation.run import EvaluatePaths, summary_metrics, write_atari_plots
    from pipeline.metagrad.grid import write_model
    from pipeline.metagrad.run import write_curves
    from pipeline.prepare import atari_score_table

    paths = EvaluatePaths.under(tmp_path)
    histories: dict = {}
    for outcome in serial_grid["outcomes"].values():
        write_model(outcome, paths.metagrad_models)
        cell = outcome.cell
        histories.setdefault(cell.game, {}).setdefault(cell.variant, {})[cell.seed] = outcome.result.history
    write_curves(histories, paths.plots_dir / "metagrad")
    config = AtariEvalConfig(episodes=2, max_episode_frames=400)
    atari = evaluate_agents(discover_agents(paths.metagrad_models), atari_score_table(), config, 0, 0.95)
    pong = atari.games["pong"]
    assert list(pong) == ["impala", "gamma_lambda"]
    for row in pong.values():
        per_seed = [cell.mean_score for cell in row.seeds.values()]
        assert list(row.seeds) == ["0", "1"] and row.num_seeds == 2
        assert row.mean_score == pytest.approx(sum(per_seed) / 2)
        assert row.ci_low <= row.mean_score <= row.ci_high
        assert row.hns == pytest.approx((row.mean_score + 20.7) / (14.6 + 20.7))
    diff = pong["gamma_lambda"].diff_vs_impala
    assert diff.mean == pytest.approx(pong["gamma_lambda"].mean_score - pong["impala"].mean_score)
    assert atari.hns["gamma_lambda"]["median"] == pytest.approx(pong["gamma_lambda"].hns)
    metrics = summary_metrics({"epg": SimpleNamespace(splits={}), "atari": atari, "promotion": {}}, "run")
    assert metrics["atari"]["pong"]["gamma_lambda"]["diff_vs_impala"]["mean"] == diff.mean
    figures = write_atari_plots(atari, paths)
    assert set(figures) == {
        "Human-normalised score per game and variant",
        "pong: return during training",
        "pong: gamma during training",
        "pong: lambda during training",
        "pong: training",
    }
    assert all(path.stat().st_size > 0 for path in figures.values())
    assert figures["pong: training"].name == "training_pong.png"  # the README's one Pong figure
