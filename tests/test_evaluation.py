"""Evaluation arithmetic: confidence intervals, human-normalised scores, promotion, the report."""

import math
import random
from dataclasses import replace

import pytest
import torch
from scipy import stats as scipy_stats

from pipeline.evaluation.epg_eval import CurvePoint, EpgEvaluation, MethodResult, curve_summary, summarise
from pipeline.evaluation.promotion import decide_promotion
from pipeline.evaluation.report import render_report
from pipeline.evaluation.stats import aggregate_hns, human_normalized, mean_ci


def test_hns_on_known_numbers():
    assert human_normalized(-20.7, -20.7, 14.6) == 0.0
    assert human_normalized(14.6, -20.7, 14.6) == 1.0
    assert human_normalized(0.0, -20.7, 14.6) == pytest.approx(20.7 / 35.3)
    assert human_normalized(30.5, 1.7, 30.5) == 1.0  # breakout
    with pytest.raises(ValueError, match="undefined"):
        human_normalized(1.0, 2.0, 2.0)


def test_median_and_mean_hns_over_games():
    assert aggregate_hns({"pong": 1.0, "breakout": 3.0, "qbert": 0.5}) == {
        "median": 1.0,
        "mean": 1.5,
        "games": 3,
    }
    assert aggregate_hns({"pong": 1.0, "breakout": math.nan}) == {"median": 1.0, "mean": 1.0, "games": 1}
    assert math.isnan(aggregate_hns({})["median"])


def test_student_t_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    interval = mean_ci(values, 0.95)
    half = scipy_stats.t.ppf(0.975, 3) * scipy_stats.tstd(values) / 2.0
    assert interval.mean == 2.5 and interval.n == 4
    assert interval.low == pytest.approx(2.5 - half) and interval.high == pytest.approx(2.5 + half)
    assert mean_ci([5.0]) == (5.0, 5.0, 5.0, 1)
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0, 3)  # no spread: the point (scipy would give nan)
    assert mean_ci([1.0, math.inf, math.nan, 3.0]).n == 2  # non-finite lifetimes are not averaged
    assert math.isnan(mean_ci([]).mean)
    assert mean_ci(values, 0.99).high > interval.high


def test_student_t_interval_by_hand():
    # [1, 2, 3, 4]: s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, s / sqrt(4) = 0.6454972243679028;
    # t_{3, 0.975} = 3.1824463052837 (tables), half-width 2.0542602567605.
    interval = mean_ci([1.0, 2.0, 3.0, 4.0], 0.95)
    assert interval.low == pytest.approx(2.5 - 2.0542602567605, abs=1e-12)
    assert interval.high == pytest.approx(2.5 + 2.0542602567605, abs=1e-12)
    # [1, 3]: mean 2, s = sqrt(2), s / sqrt(2) = 1; t_{1, 0.95} = 6.3137515146750 (90 % interval).
    interval = mean_ci([1.0, 3.0], 0.90)
    t = 6.3137515146750
    assert (interval.low, interval.high) == pytest.approx((2 - t, 2 + t), abs=1e-12)


def test_scipy_interval_equals_the_closed_form_it_replaced():
    rng = random.Random(0)
    for _ in range(50):
        values = [rng.gauss(0.0, 10.0) for _ in range(rng.randint(2, 80))]
        for confidence in (0.9, 0.95, 0.99):
            n, mean = len(values), sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            half = scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1) * sd / math.sqrt(n)
            interval = mean_ci(values, confidence)
            assert interval.mean == mean
            assert (interval.low, interval.high) == pytest.approx((mean - half, mean + half), rel=1e-12)


def test_promotion_without_champion_better_and_worse():
    assert decide_promotion(-40.0, None).promote
    assert decide_promotion(-40.0, -45.0).promote
    worse = decide_promotion(-50.0, -45.0)
    assert not worse.promote and "does not beat" in worse.reason
    assert not decide_promotion(-45.0, -45.0).promote  # ties keep the champion
    assert not decide_promotion(math.nan, None).promote


def fake_results() -> dict:
    summary = MethodResult(
        mean=-44.0, ci_low=-46.0, ci_high=-42.0, lifetimes=80, finite_lifetimes=80, nonfinite_lifetimes=0
    )
    return {
        "seed": 0,
        "pipeline_run_id": "abc123",
        "git_commit": "deadbeef",
        "loss": {
            "reference": "models/epg/loss.pt",
            "version": "3",
            "generation": 17,
            "fitness": -40.0,
            "generations": 20,
        },
        "epg": EpgEvaluation(
            family="point_goal",
            env_steps_per_lifetime=1024,
            seeds=5,
            tasks_per_split={"test": 16, "ood": 16},
            splits={
                "test": {"evolved": summary, "ppo": replace(summary, mean=-47.5)},
                "ood": {"evolved": replace(summary, mean=-91.0)},
            },
        ),
        "promotion": {"summary": "alias 'champion' moved to version 3: there is no champion yet"},
        "atari": {
            "games": {
                "pong": {
                    "impala": {
                        **atari_row(-20.4, -20.9, -19.9, 0.0085),
                        "seeds": {"0": atari_cell(-20.2, 0.01), "1": atari_cell(-20.6, 0.007)},
                    },
                    "gamma_lambda": {
                        **atari_row(-19.0, -21.0, -17.0, 0.05),
                        "seeds": {"0": atari_cell(-18.0, 0.08), "1": atari_cell(-20.0, 0.02)},
                        "diff_vs_impala": {"mean": 1.4, "ci_low": -9.0, "ci_high": 12.0, "seeds": 2},
                    },
                }
            },
            "hns": {
                "impala": {"median": 0.0085, "mean": 0.0085, "games": 1},
                "gamma_lambda": {"median": 0.05, "mean": 0.05, "games": 1},
            },
            "paper_median_hns_percent": {"impala": 191.8, "gamma_lambda": 242.6},
            "confidence": 0.95,
        },
        "figures": {"Learning curves, test tasks": "curves_test.png"},
        "run_ids": {"evolve": "r1", "evaluate": "r2"},
        "params": {"seed": 0, "evolve": {"popsize": 16}},
    }


def atari_row(mean: float, low: float, high: float, hns: float) -> dict:
    return {
        "mean_score": mean,
        "ci_low": low,
        "ci_high": high,
        "hns": hns,
        "hns_ci_low": hns - 0.01,
        "hns_ci_high": hns + 0.01,
        "num_seeds": 2,
        "gamma": 0.99,
        "lambda": 1.0,
        "train_frames": 500000,
    }


def atari_cell(mean: float, hns: float) -> dict:
    return {
        "mean_score": mean,
        "ci_low": mean - 0.5,
        "ci_high": mean + 0.5,
        "hns": hns,
        "gamma": 0.99,
        "lambda": 1.0,
        "scores": [mean] * 10,
    }


def test_report_holds_tables_figures_params_and_run_ids():
    report = render_report(fake_results())
    assert "| test | evolved loss (EPG) | -44.00 | [-46.00, -42.00] | 80 | 0 |" in report
    assert "| test | PPO | -47.50 |" in report
    assert (
        "| pong | IMPALA {} | -20.4 [-20.9, -19.9] | 0.9 % [-0.1, 1.9] | 2 | 0.9900 | 1.000 | 500,000 |"
        in report
    )
    assert "| pong | {γ, λ} − IMPALA {} | 1.4 [-9.0, 12.0] | 2 |" in report
    assert "| pong | {γ, λ} | 1 | -20.0 [-20.5, -19.5] | 2.0 % | 0.9900 | 1.000 | 10 |" in report
    assert "| {γ, λ} | 5.0 % over 1 game(s) | 242.6 % |" in report
    assert "191.8 %" in report and "not** produced by this run" in report
    assert "![Learning curves, test tasks](curves_test.png)" in report
    assert "`r2`" in report and "popsize: 16" in report
    assert "moved to version 3" in report


def test_report_without_atari_section():
    results = fake_results()
    del results["atari"]
    report = render_report(results)
    assert "Atari" not in report and "evolved loss" in report


def test_epg_results_are_typed_and_serialise_to_the_former_layout():
    curve = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0], [0.0, 2.0]])  # [updates, lifetimes]
    points = curve_summary(curve, [32, 64, 96, 128], points=2, confidence=0.95)
    assert [p.env_steps for p in points] == [64, 128]  # every second point
    assert (points[0].mean, points[0].low, points[0].high) == (2.0, 2.0, 2.0)
    assert points[1].mean == 1.0 and points[1].low < 1.0 < points[1].high
    result = summarise(torch.tensor([1.0, math.nan, 3.0]), torch.tensor([False, True, False]), 0.95, points)
    assert (result.mean, result.lifetimes, result.finite_lifetimes, result.nonfinite_lifetimes) == (
        2.0,
        3,
        2,
        1,
    )
    evaluation = EpgEvaluation("point_goal", 128, 1, {"test": 3}, {"test": {"evolved": result}})
    assert evaluation.mean_return("test", "evolved") == 2.0
    assert math.isnan(evaluation.mean_return("ood", "evolved"))
    assert math.isnan(evaluation.mean_return("test", "ppo"))
    as_dict = evaluation.to_dict()
    assert list(as_dict) == ["family", "env_steps_per_lifetime", "seeds", "tasks_per_split", "splits"]
    evolved = as_dict["splits"]["test"]["evolved"]
    assert list(evolved) == [
        "mean",
        "ci_low",
        "ci_high",
        "lifetimes",
        "finite_lifetimes",
        "nonfinite_lifetimes",
        "curve",
    ]
    assert evolved["curve"][0] == {"env_steps": 64, "mean": 2.0, "low": 2.0, "high": 2.0}
    assert isinstance(points[0], CurvePoint)
