"""Evaluation arithmetic: confidence intervals, human-normalised scores, promotion, the report."""

import math
import random
import re
from dataclasses import replace

import pytest
import torch
from scipy import stats as scipy_stats

from pipeline.config import METAGRAD_VARIANTS
from pipeline.evaluation.compare import LifetimeCurves, compare, epg_curves, steps_to_reach
from pipeline.evaluation.epg_eval import (
    CurvePoint,
    EpgEvaluation,
    MethodResult,
    curve_summary,
    evaluate_loss_curves,
    summarise,
)
from pipeline.evaluation.promotion import decide_promotion
from pipeline.evaluation.report import _milestone_cells, render_report
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
            evolved_lifetime_steps=1024,
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


def test_seed_rows_say_fixed_for_what_a_variant_does_not_meta_learn():
    cell = {
        "frames_to_return": {"10": 9_000_000, "18": None},
        "gamma_settled_at": 640,
        "lambda_settled_at": 9_480_000,
    }
    assert _milestone_cells(cell, METAGRAD_VARIANTS["impala"]) == ["9 M / not reached", "fixed / fixed"]
    assert _milestone_cells(cell, METAGRAD_VARIANTS["lambda"]) == ["9 M / not reached", "fixed / 9.48 M"]
    assert _milestone_cells(cell, METAGRAD_VARIANTS["gamma_lambda"])[1] == "0.00064 M / 9.48 M"
    assert _milestone_cells(None, ()) == ["–", "–"]


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
    evaluation = EpgEvaluation("point_goal", 128, 1, {"test": 3}, {"test": {"evolved": result}}, 128)
    assert evaluation.mean_return("test", "evolved") == 2.0
    assert math.isnan(evaluation.mean_return("ood", "evolved"))
    assert math.isnan(evaluation.mean_return("test", "ppo"))
    as_dict = evaluation.to_dict()
    assert list(as_dict) == [
        "family",
        "env_steps_per_lifetime",
        "seeds",
        "tasks_per_split",
        "splits",
        "evolved_lifetime_steps",
    ]
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


# ------------------------------------------------------------------------ the comparison at equal steps
def hand_curves(maml_returns: list[list[float]] | None = None, ppo_shift: float = 0.0) -> dict:
    """Budget 12; the EPG methods' points at x = 0, 3, 6, 9 (M = 3), MAML's at 0, 2, 4, 8, 12 (K = 2)."""
    epg_steps = [0, 3, 6, 9]
    curves = {
        "evolved": LifetimeCurves(epg_steps, torch.tensor([[10.0, 20, 30, 40], [12, 22, 32, 42]])),
        "ppo": LifetimeCurves(epg_steps, torch.tensor([[10.0, 12, 14, 16], [12, 14, 16, 18]]) + ppo_shift),
        "random_loss": LifetimeCurves(epg_steps, torch.zeros(2, 4)),
        "maml": LifetimeCurves(
            [0, 2, 4, 8, 12], torch.tensor(maml_returns or [[5.0, 15, 25, 26, 27], [5, 15, 25, 26, 27]])
        ),
    }
    return curves


def test_table_columns_are_each_methods_latest_point_at_or_before_the_columns_env_steps():
    comparison = compare({"test": hand_curves()}, budget=12, inner_steps=2, confidence=0.95)
    table = comparison.splits["test"]
    # x_1 = MAML's env steps after 1 inner step (2), x_K after K = 2 steps (4), mid = 6, end = 12
    assert table.columns == {"1 step": 2, "K: 2 steps": 4, "mid": 6, "end": 12}
    means = {m: [c.mean for c in row.returns.values()] for m, row in table.rows.items()}
    assert means["evolved"] == [11.0, 21.0, 31.0, 41.0]  # points at x = 0, 3, 6, 9
    assert means["ppo"] == [11.0, 13.0, 15.0, 17.0]
    assert means["maml"] == [15.0, 25.0, 25.0, 27.0]  # x = 2, 4, 4 (6 lies before 8), 12
    assert table.best == {"1 step": "maml", "K: 2 steps": "maml", "mid": "evolved", "end": "evolved"}
    # two lifetimes 10 and 12: mean 11, s / sqrt(2) = 1, t_{1, 0.975} = 12.706204736174
    cell = table.rows["evolved"].returns["1 step"]
    assert (cell.low, cell.high, cell.n) == pytest.approx((11 - 12.706204736174, 11 + 12.706204736174, 2))
    assert table.ppo_final == 17.0
    steps = {m: row.steps_to_ppo_final for m, row in table.rows.items()}
    assert steps == {"evolved": 3, "ppo": 9, "random_loss": None, "maml": 4}
    learns = {m: row.learns for m, row in table.rows.items()}
    # evolved: last CI [28.3, 53.7] above first [-1.7, 23.7]; PPO's last low 4.3 is not above 23.7
    assert learns == {"evolved": True, "ppo": False, "random_loss": False, "maml": True}


def test_steps_to_reach_is_the_first_point_whose_mean_reaches_the_target():
    curve = LifetimeCurves([0, 10, 20], torch.tensor([[1.0, 5, 3], [1, 3, 9]]))  # means 1, 4, 6
    assert steps_to_reach(curve, 4.0) == 10  # reached exactly
    assert steps_to_reach(curve, 4.5) == 20
    assert steps_to_reach(curve, 0.0) == 0
    assert steps_to_reach(curve, 6.5) is None
    assert steps_to_reach(curve, math.nan) is None


def test_claim_a_paired_difference_both_ways():
    claim = compare({"test": hand_curves()}, 12, 2, 0.95).claims[0]
    # evolved - PPO per lifetime: at x_K = 4 (points x = 3): 20 - 12, 22 - 14 = 8, 8; at mid 6: 16, 16
    assert claim.claim == "a" and claim.reproduced is True
    assert [c.mean for c in claim.evidence.values()] == [8.0, 16.0]
    assert claim.verdict.startswith("reproduced: evolved − PPO at K: 2 steps 8.0 [8.0, 8.0]")
    claim = compare({"test": hand_curves(ppo_shift=10.0)}, 12, 2, 0.95).claims[0]
    assert claim.reproduced is False  # at x_K: 8 - 10 = -2 per lifetime
    assert claim.verdict.startswith("not reproduced: evolved − PPO at K: 2 steps -2.0")
    without_ppo = {m: c for m, c in hand_curves().items() if m != "ppo"}
    assert compare({"test": without_ppo}, 12, 2, 0.95).claims[0].reproduced is None


def test_claim_b_evolved_keeps_learning_and_maml_adaptation_does_not_both_ways():
    # MAML adapts: K - 0 steps = 25 - 5 = 20 in both lifetimes, CI above 0: the claim is not reproduced
    claim = compare({"ood": hand_curves()}, 12, 2, 0.95).claims[0]
    assert claim.claim == "b" and claim.reproduced is False
    assert claim.evidence["evolved: end − K steps"].mean == 20.0  # 40 - 20 and 42 - 22
    assert claim.evidence["MAML: K steps − 0 steps"].mean == 20.0
    # MAML's adaptation gains +1 and -1: mean 0, CI around 0; evolved keeps learning: reproduced
    flat = [[5.0, 5, 6, 6, 6], [5, 5, 4, 4, 4]]
    claim = compare({"ood": hand_curves(flat)}, 12, 2, 0.95).claims[0]
    assert claim.reproduced is True and claim.evidence["MAML: K steps − 0 steps"].mean == 0.0
    assert claim.verdict.startswith("reproduced")
    assert compare({"ood": hand_curves()}, 12, None, 0.95).claims[0].reproduced is None
    # MAML's first N episodes took more than the budget: theta0's point alone, no 1 / K columns
    curves = hand_curves()
    curves["maml"] = LifetimeCurves([0], torch.tensor([[5.0], [5.0]]))
    comparison = compare({"ood": curves}, 12, 2, 0.95)
    assert comparison.splits["ood"].columns == {"mid": 6, "end": 12}
    assert comparison.claims[0].reproduced is None and "did not fit" in comparison.claims[0].verdict


def test_claim_b_is_not_checkable_when_maml_sits_at_its_return_ceiling():
    """MAML's flat curve at its ceiling would 'reproduce' (b) by construction: no gain was possible."""
    flat = [[5.0, 5, 6, 6, 6], [5, 5, 4, 4, 4]]  # K-step mean 5.0
    assert compare({"ood": hand_curves(flat)}, 12, 2, 0.95, maml_ceiling=5.0).claims[0].reproduced is None
    claim = compare({"ood": hand_curves(flat)}, 12, 2, 0.95, maml_ceiling=5.2).claims[0]
    assert claim.verdict.startswith("not checkable: MAML's return after K steps (5.0) is at its ceiling (5.2")
    assert "evolved: end − K steps 20.0" in claim.verdict
    # below 95 % of the ceiling (5.0 < 0.95 x 5.3 = 5.035) the claim is checked as before
    claim = compare({"ood": hand_curves(flat)}, 12, 2, 0.95, maml_ceiling=5.3).claims[0]
    assert claim.reproduced is True
    assert claim.verdict.endswith("(MAML's return after K steps 5.0 of its ceiling 5.3)")


def test_return_ceiling_is_the_horizon_times_the_step_reward_bound():
    from pipeline.evaluation.adapt_eval import return_ceiling

    assert return_ceiling({"family": "random_cartpole", "maml": {"horizon": 100}}) == 100.0
    assert return_ceiling({"family": "random_cartpole", "maml": {"horizon": 900}}) == 500.0  # env limit
    assert return_ceiling({"family": "point_goal", "maml": {"horizon": 50}}) is None


def test_epg_curves_sit_at_the_steps_trained_on_and_carry_the_last_finished_episodes_forward():
    curve = torch.tensor([[math.nan, 2.0], [3.0, math.nan], [math.nan, 4.0]])  # [updates, lifetimes]
    curves = epg_curves(curve, [32, 64, 96], update_every=32)
    assert curves.env_steps == [0, 32, 64]
    assert torch.equal(torch.isnan(curves.returns[0]), torch.tensor([True, False, False]))
    assert curves.returns[0, 1:].tolist() == [3.0, 3.0] and curves.returns[1].tolist() == [2.0, 2.0, 4.0]
    assert torch.isnan(curves.at(-1)).all() and curves.at(40).tolist() == [3.0, 2.0]
    with pytest.raises(ValueError, match="ascend"):
        LifetimeCurves([0, 2, 1], torch.zeros(1, 3))


def test_report_states_the_table_and_both_claims():
    results = fake_results()
    results["comparison"] = compare({"test": hand_curves(), "ood": hand_curves()}, 12, 2, 0.95)
    report = render_report(results)
    assert "| method | 1 step (2) | K: 2 steps (4) | mid (6) | end (12) |" in report
    assert "| MAML θ₀ (K inner steps, then PG) | 15.0 [15.0, 15.0] * | 25.0 [25.0, 25.0] * |" in report
    assert "| 4 | 5.0 [5.0, 5.0] → 27.0 [27.0, 27.0] | yes |" in report
    assert "**reproduced: evolved − PPO at K: 2 steps 8.0" in report
    assert "**not reproduced: evolved: end − K steps 20.0" in report
    assert results["comparison"].to_dict()["splits"]["test"]["rows"]["ppo"]["learns"] is False
    from pipeline.evaluation.run import _flat_numbers

    names = _flat_numbers({"comparison": results["comparison"].to_dict()})
    assert "comparison.splits.test.rows.maml.returns.K: 2 steps.mean" in names
    assert all(re.fullmatch(r"[\w\-. :/]+", name, re.ASCII) for name in names)  # MLflow's metric names


def test_evaluate_library_compares_every_method_on_a_tiny_setting(tmp_path):
    from pipeline.config import EpgEvalConfig
    from pipeline.envs.tasks import sample_tasks
    from pipeline.evaluation.adapt_eval import adapting_curves
    from pipeline.io import torch_save

    family = "point_goal"  # 50-step episodes: the post-training episode is short
    loss = tiny_loss(family)
    splits = {split: sample_tasks(family, split, 2, 0) for split in ("test", "ood")}
    config = EpgEvalConfig(
        seeds=2,
        methods=["evolved", "ppo", "maml", "pretrained"],
        max_tasks_per_split=2,
        device="cpu",
        maml_policy=str(tmp_path / "policy.pt"),
        pretrained_policy=str(tmp_path / "missing.pt"),
    )
    evaluation, curves = evaluate_loss_curves(loss, splits, config, seed=0)
    policies = {"maml": tmp_path / "policy.pt", "pretrained": tmp_path / "missing.pt"}
    torch_save(policies["maml"], maml_policy_file("random_cartpole"))
    with pytest.raises(ValueError, match="family 'random_cartpole', the evolved loss's is 'point_goal'"):
        adapting_curves(policies, family, splits, config, 96, seed=0)
    torch_save(policies["maml"], maml_policy_file(family))
    with pytest.raises(FileNotFoundError, match="lists 'pretrained' but .*missing.pt does not exist"):
        adapting_curves(policies, family, splits, config, 96, seed=0)
    policies["pretrained"] = policies["maml"]  # the same file: the two must give the same curves
    adapting, inner_steps, ceiling = adapting_curves(policies, family, splits, config, 96, seed=0)
    assert ceiling is None  # point_goal's returns have no ceiling
    assert inner_steps == 1
    curves = {split: {**curves[split], **adapting[split]} for split in curves}
    comparison = compare(curves, evaluation.env_steps_per_lifetime, inner_steps, 0.95)
    for split in ("test", "ood"):
        maml = curves[split]["maml"]
        assert maml.returns.shape[0] == 4 and maml.env_steps[0] == 0 and maml.env_steps[-1] <= 96
        assert torch.equal(maml.returns, curves[split]["pretrained"].returns)
        assert set(curves[split]) == {"evolved", "ppo", "maml", "pretrained"}
        assert curves[split]["ppo"].env_steps == [0, 32, 64]  # 96 steps, updates every 32
        assert curves[split]["ppo"].returns.shape == (4, 3)  # 2 seeds x 2 tasks
        table = comparison.splits[split]
        assert table.columns == {"K: 1 step": maml.env_steps[1], "mid": 48, "end": 96}
        assert table.rows["ppo"].returns["end"].mean == pytest.approx(
            float(curves[split]["ppo"].returns[:, -1].nanmean())
        )
    assert [c.claim for c in comparison.claims] == ["a", "b"]
    assert all(c.reproduced in (True, False) for c in comparison.claims)


def test_a_longer_evaluation_lifetime_repeats_the_evolved_one_then_goes_on():
    """evaluate.epg.lifetime_steps = 2U: every method's first U steps are the U-step lifetime's (same
    random numbers), then training continues; the report names both lifetimes."""
    from pipeline.config import EpgEvalConfig
    from pipeline.envs.tasks import sample_tasks
    from pipeline.evaluation.report import epg_section

    family = "point_goal"
    loss = tiny_loss(family)
    splits = {"test": sample_tasks(family, "test", 2, 0)}
    base = dict(seeds=1, methods=["evolved"], max_tasks_per_split=1, splits=["test"], device="cpu")
    own, own_curves = evaluate_loss_curves(loss, splits, EpgEvalConfig(**base), seed=0)
    longer, longer_curves = evaluate_loss_curves(
        loss, splits, EpgEvalConfig(**base, lifetime_steps=192), seed=0
    )
    assert (own.env_steps_per_lifetime, own.evolved_lifetime_steps) == (96, 96)
    assert (longer.env_steps_per_lifetime, longer.evolved_lifetime_steps) == (192, 96)
    short, long = own_curves["test"]["evolved"], longer_curves["test"]["evolved"]
    assert long.env_steps == [0, 32, 64, 96, 128, 160]
    torch.testing.assert_close(long.returns[:, :3], short.returns, rtol=0, atol=0, equal_nan=True)
    assert "evolved with 96-step lifetimes" in "\n".join(epg_section(longer, {}))
    assert "evolved with" not in "\n".join(epg_section(own, {}))
    with pytest.raises(ValueError, match=r"evaluate.epg.lifetime_steps \(100\) must be a multiple"):
        evaluate_loss_curves(loss, splits, EpgEvalConfig(**base, lifetime_steps=100), seed=0)


def tiny_loss(family: str) -> dict:
    """A loss file's content as the evolve stage writes it: a tiny loss network on 96-step lifetimes."""
    from tests.epg_helpers import TINY_INNER, TINY_NET, tiny_phi

    phi = tiny_phi(family, 1)
    return {
        "family": family,
        "phi": phi[0],
        "inner": {**TINY_INNER.model_dump(), "fitness_episodes": 1},
        "loss_net": TINY_NET.model_dump(),
        "input_dim": phi.shape[1],
    }


def maml_policy_file(family: str) -> dict:
    """A policy file in the maml stage's format, theta0 freshly initialised: 1 inner step, N = 2
    episodes of at most 20 steps, so K + 1 samplings fit a 96-step budget."""
    from pipeline.config import MamlConfig
    from pipeline.maml.learner import init_theta, policy_spec

    config = MamlConfig(family=family, rollouts_per_task=2, horizon=20, inner_steps=1, policy_hidden=[8])
    spec = policy_spec(family, config)
    return {
        "theta": init_theta(spec, 0),
        "family": family,
        "obs_dim": spec.obs_dim,
        "action_dim": spec.action_dim,
        "discrete": spec.discrete,
        "maml": config.model_dump(mode="json"),
    }
