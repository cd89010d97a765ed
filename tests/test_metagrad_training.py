"""Tests of the metagrad training loop and stage: checkpoints and resume, the stage script's outputs,
and curves drawn from checkpoints. The learner's maths is tested in test_metagrad.py."""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from test_metagrad import metagrad_config, one_torch_thread  # noqa: F401  (helpers; autouse fixture)

from pipeline.cli import main as cli_main
from pipeline.config import MetagradConfig
from pipeline.io import torch_load
from pipeline.metagrad import train as train_module
from pipeline.metagrad.learner import MetaGradientLearner
from pipeline.metagrad.run import checkpoint_histories
from pipeline.metagrad.train import train_variant
from pipeline.nets.atari import AtariActorCritic

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- training loop
class RecordingTracker:
    """Stands in for the stage's MLflow run."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.flushes = 0

    def queue_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def flush_metrics(self):
        self.flushes += 1


FRAMES_PER_UPDATE = 4 * 5 * 4  # num_envs x unroll x frameskip


def training_config(**overrides) -> MetagradConfig:
    return metagrad_config(
        **{"frames": 4 * FRAMES_PER_UPDATE, "num_envs": 4, "unroll": 5, "checkpoint_every": 2, **overrides}
    )


@dataclass
class TrainedRun:
    config: MetagradConfig
    checkpoint: Path
    result: train_module.VariantResult
    learner: MetaGradientLearner
    tracker: RecordingTracker


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    """One short gamma_lambda run on pong: 4 updates, checkpoints after updates 2 and 4."""
    config = training_config()
    checkpoint = tmp_path_factory.mktemp("train") / "pong_gamma_lambda.pt"
    tracker = RecordingTracker()
    result, learner = train_variant(config, "pong", "gamma_lambda", 0, checkpoint, tracker=tracker)
    return TrainedRun(config, checkpoint, result, learner, tracker)


def copy_checkpoint(run: TrainedRun, folder: Path) -> Path:
    target = folder / run.checkpoint.name
    target.write_bytes(run.checkpoint.read_bytes())
    return target


def test_train_variant_learns_eta_and_checkpoints(trained):
    config, result = trained.config, trained.result
    assert (result.updates, result.frames) == (4, 4 * FRAMES_PER_UPDATE)
    assert result.history.update_frames == [FRAMES_PER_UPDATE * k for k in range(1, 5)]
    metrics = trained.tracker.metrics
    assert [step for step, _ in metrics] == result.history.update_frames
    losses = [m[f"loss/{k}"] for _, m in metrics for k in ("total", "policy", "baseline")]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    # the first update has nothing to meta-learn yet; afterwards gamma and lambda move
    assert "meta/grad_gamma_logit" not in metrics[0][1]
    assert all("meta/grad_gamma_logit" in m for _, m in metrics[1:])
    assert result.history.gammas[0] == pytest.approx(config.meta.init_gamma, abs=1e-6)
    assert result.history.lambdas[0] == pytest.approx(config.meta.init_lambda, abs=1e-6)
    assert abs(result.gamma - config.meta.init_gamma) > 1e-6
    assert abs(result.lambda_ - config.meta.init_lambda) > 1e-8  # moved (meta steps are ~1e-5 at most here)
    assert result.gamma == pytest.approx(trained.learner.eta()[0].item())

    assert trained.checkpoint.exists()
    state = torch_load(trained.checkpoint)
    assert (state["updates"], state["frames"], state["done"]) == (4, 4 * FRAMES_PER_UPDATE, True)
    assert state["history"]["gammas"] == result.history.gammas


def test_finished_run_resumes_at_its_end(trained, tmp_path):
    checkpoint = copy_checkpoint(trained, tmp_path)
    again, learner = train_variant(trained.config, "pong", "gamma_lambda", 0, checkpoint)
    assert (again.updates, again.frames) == (4, 4 * FRAMES_PER_UPDATE)  # nothing left to train
    assert again.history == trained.result.history
    torch.testing.assert_close(learner.eta_logits, trained.learner.eta_logits, rtol=0, atol=0)
    for (name, p), q in zip(learner.net.named_parameters(), trained.learner.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


class Killed(Exception):
    pass


def train_until_killed_in_update_3(config: MetagradConfig, checkpoint: Path, monkeypatch) -> dict:
    """A gamma_lambda run that dies inside its third update; returns the checkpoint it left."""
    original_update = MetaGradientLearner.update
    calls = []

    def dies_in_update_3(self, rollout):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return original_update(self, rollout)

    with monkeypatch.context() as patch:
        patch.setattr(MetaGradientLearner, "update", dies_in_update_3)
        with pytest.raises(Killed):
            train_variant(config, "pong", "gamma_lambda", 0, checkpoint)
    return torch_load(checkpoint)


def test_killed_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(trained, tmp_path, monkeypatch):
    """Killed in update 3, resumed from the update-2 checkpoint: learner, eta curve and episodes are
    bit for bit those of the uninterrupted run (emulators, RNGs and the pending meta step restored)."""
    checkpoint = tmp_path / "pong_gamma_lambda.pt"
    state = train_until_killed_in_update_3(trained.config, checkpoint, monkeypatch)  # written after 2
    assert (state["updates"], state["frames"], state["done"]) == (2, 2 * FRAMES_PER_UPDATE, False)
    assert state["learner"]["pending"] is not None, "the meta step of update 3 needs update 2's inputs"

    result, learner = train_variant(trained.config, "pong", "gamma_lambda", 0, checkpoint)
    assert (result.updates, result.frames) == (4, 4 * FRAMES_PER_UPDATE)
    assert result.history == trained.result.history
    assert "meta/grad_gamma_logit" in str(trained.tracker.metrics[2][1])  # update 3 took a meta step
    torch.testing.assert_close(learner.eta_logits, trained.learner.eta_logits, rtol=0, atol=0)
    for (name, p), q in zip(learner.net.named_parameters(), trained.learner.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def start_of_training(config: MetagradConfig, checkpoint: Path, monkeypatch) -> bool:
    """Run train_variant up to its first rollout (if any is left); True if it resumed from ``checkpoint``."""
    loaded = []
    original_load = MetaGradientLearner.load_state_dict

    def spy(self, state):
        loaded.append(state)
        original_load(self, state)

    def no_actor(*args, **kwargs):
        raise Killed  # training would start here

    with monkeypatch.context() as patch:
        patch.setattr(MetaGradientLearner, "load_state_dict", spy)
        patch.setattr(train_module, "Actor", no_actor)
        try:
            train_variant(config, "pong", "gamma_lambda", 0, checkpoint)
        except Killed:
            pass
    return bool(loaded)


def test_checkpoint_of_other_params_is_not_resumed(trained, tmp_path, monkeypatch):
    checkpoint = copy_checkpoint(trained, tmp_path)
    assert start_of_training(trained.config, checkpoint, monkeypatch) is True  # the spy sees a resume
    for change in ({"lr": 1e-3}, {"gamma": 0.9}, {"num_envs": 2}):
        other = trained.config.model_copy(update=change)
        assert start_of_training(other, checkpoint, monkeypatch) is False, change
    assert torch_load(checkpoint)["updates"] == 4  # untouched: no run got as far as a checkpoint


def test_a_cpu_run_keeps_its_torch_threads():
    threads = torch.get_num_threads()
    train_module.limit_cpu_threads_for(torch.device("cpu"))
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------------------------- stage script
STAGE_FRAMES = 1280  # 20 updates of 4 envs x 4 steps x 4 frames per variant


def write_params(path: Path, **metagrad) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["metagrad"].update(metagrad)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(
    params: Path, output_root: Path, cwd: Path, stage: str = "metagrad", prelude: str = ""
) -> subprocess.CompletedProcess:
    """``python stages/<stage>.py`` in a subprocess; ``prelude`` is Python run first in the same process
    (e.g. a patch that injects a fault)."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        "PIPELINE_LOG_LEVEL": "WARNING",
        "PIPELINE_RUN_ID": f"test-{stage}",
        "OMP_NUM_THREADS": "1",
    }
    script = ROOT / "stages" / f"{stage}.py"
    argv = [str(script), "--params", str(params), "--output-root", str(output_root)]
    launcher = (
        f"import runpy, sys\nsys.argv = {argv!r}\n{prelude}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", launcher],
        cwd=cwd,  # MLflow puts the artifacts of a sqlite store under the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_stage_script_writes_models_metrics_and_curves(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(
        tmp_path / "params.yaml",
        frames=STAGE_FRAMES,
        num_envs=4,
        unroll=4,
        device="cpu",
        env={"frameskip": 4, "stack": 4, "noop_max": 30, "max_episode_frames": 108000, "env_threads": 1},
    )
    out = tmp_path / "out"
    done = run_stage(params, out, work)
    assert done.returncode == 0, done.stderr[-3000:]

    updates = STAGE_FRAMES // (4 * 4 * 4)
    for variant in ("impala", "gamma_lambda"):
        model = torch_load(out / "models/metagrad/pong" / variant / "seed0.pt")
        assert (model["game"], model["variant"], model["frames"]) == ("pong", variant, STAGE_FRAMES)
        net = AtariActorCritic(model["num_actions"], model["network"], model["stack"], model["embedding_dim"])
        net.load_state_dict(model["state_dict"])
    assert torch_load(out / "models/metagrad/pong/impala/seed0.pt")["eta"] == pytest.approx([0.99, 1.0])

    metrics = json.loads((out / "metrics/metagrad.json").read_text())
    assert set(metrics["pong"]) == {"impala", "gamma_lambda"}
    for variant, seeds in metrics["pong"].items():
        assert list(seeds) == ["seed0"], variant
        assert (seeds["seed0"]["frames"], seeds["seed0"]["updates"]) == (STAGE_FRAMES, updates), variant
    impala = metrics["pong"]["impala"]["seed0"]
    assert (impala["gamma"], impala["lambda"]) == pytest.approx((0.99, 1.0))
    assert metrics["pong"]["gamma_lambda"]["seed0"]["gamma"] != pytest.approx(0.99, abs=1e-7)
    run_id = metrics["mlflow_run_id"]
    with sqlite3.connect(work / "mlflow.db") as db:
        status = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchall()
        children = db.execute(
            "SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'pipeline.cell' AND r.run_uuid IN "
            "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?)",
            (run_id,),
        ).fetchall()
        child_metrics = {
            row[0]
            for row in db.execute(
                "SELECT DISTINCT key FROM metrics WHERE run_uuid IN "
                "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?)",
                (run_id,),
            )
        }
    assert status == [("FINISHED",)]
    assert sorted(children) == [("FINISHED", "pong/gamma_lambda/seed0"), ("FINISHED", "pong/impala/seed0")]
    assert {"loss/total", "gamma", "frames_per_second"} <= child_metrics

    plots = out / "plots/metagrad"
    for variant in ("impala", "gamma_lambda"):
        columns, rows = read_rows(plots / f"eta_pong_{variant}_seed0.csv")
        assert columns == ["frames", "gamma", "lambda"]
        assert [int(r["frames"]) for r in rows] == [64 * k for k in range(1, updates + 1)]
        columns, rows = read_rows(plots / f"returns_pong_{variant}_seed0.csv")
        assert columns == ["frames", "episode_return"]
    _, impala_rows = read_rows(plots / "eta_pong_impala_seed0.csv")
    assert all(float(r["gamma"]) == pytest.approx(0.99) and float(r["lambda"]) == 1.0 for r in impala_rows)
    _, learned_rows = read_rows(plots / "eta_pong_gamma_lambda_seed0.csv")
    assert float(learned_rows[-1]["gamma"]) != float(learned_rows[0]["gamma"])
    for name in ("returns_pong.png", "gamma_pong.png", "lambda_pong.png"):
        assert (plots / name).stat().st_size > 0


def test_stage_script_rejects_unknown_game_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(tmp_path / "params.yaml", games=["pongg"])
    out = tmp_path / "out"
    done = run_stage(params, out, work)
    assert done.returncode == 2
    assert "metagrad.games" in done.stderr and "pong" in done.stderr
    assert not out.exists()
    assert list(work.iterdir()) == []


def test_curves_command_reads_checkpoints_of_a_stopped_run(trained, tmp_path):
    """`python -m pipeline curves` renders a run's curves from its checkpoints, without its outputs."""
    folder = tmp_path / "checkpoints"
    (folder / "pong/gamma_lambda").mkdir(parents=True)
    copy_checkpoint(trained, folder / "pong/gamma_lambda").rename(folder / "pong/gamma_lambda/seed3.pt")
    (folder / "run.json").write_text("{}")  # the stage's run file sits beside the checkpoints
    histories = checkpoint_histories(folder)
    assert list(histories) == ["pong"] and list(histories["pong"]) == ["gamma_lambda"]
    assert histories["pong"]["gamma_lambda"] == {3: trained.result.history}

    out = tmp_path / "curves"
    assert cli_main(["curves", str(folder), "--out", str(out)]) == 0
    _, rows = read_rows(out / "eta_pong_gamma_lambda_seed3.csv")
    assert [float(r["gamma"]) for r in rows] == pytest.approx(trained.result.history.gammas)
    assert (out / "returns_pong.png").stat().st_size > 0
    milestones = json.loads((out / "milestones.json").read_text())["pong"]["gamma_lambda"]["3"]
    assert milestones["gamma_final"] == pytest.approx(trained.result.history.gammas[-1])
    assert milestones["frames"] == trained.result.history.update_frames[-1]
    assert milestones["frames_to_return"] == {"10": None, "18": None}  # a few updates do not win Pong

    assert cli_main(["curves", str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_score_command_plays_trained_agents(trained, tmp_path, capsys):
    """`python -m pipeline score` gives no-op-start raw and human-normalised scores of exported agents."""
    models = tmp_path / "models"
    train_module.export_model(
        trained.learner, trained.result, trained.config, models / "pong/gamma_lambda/seed0.pt"
    )
    out, seeds_json = tmp_path / "score.json", tmp_path / "pong_seeds.json"
    assert (
        cli_main(
            ["score", str(models), "--episodes", "2", "--out", str(out), "--seeds-json", str(seeds_json)]
        )
        == 0
    )
    result = json.loads(out.read_text())["games"]["pong"]["gamma_lambda"]["seeds"]["0"]
    assert len(result["scores"]) == 2 and all(-21 <= s <= 21 for s in result["scores"])
    assert result["mean_score"] == pytest.approx(sum(result["scores"]) / 2)
    assert result["hns"] == pytest.approx((result["mean_score"] + 20.7) / (14.6 + 20.7))
    assert result["gamma"] == pytest.approx(trained.result.gamma)
    assert all(1 <= n <= 30 for n in result["start_frames"])  # 1 + up to 29 no-op frames
    assert "pong/gamma_lambda/seed0: mean raw score" in capsys.readouterr().out
    seeds = json.loads(seeds_json.read_text())  # the shape of docs/results/pong_seeds.json
    assert seeds == {
        "gamma_lambda": {
            "0": {
                "mean": result["mean_score"],
                "ci_low": result["ci_low"],
                "ci_high": result["ci_high"],
                "episodes": 2,
                "frames": result["train_frames"],
            }
        }
    }

    assert cli_main(["score", str(tmp_path / "empty")]) == 2
    with pytest.raises(SystemExit):
        cli_main(["score", str(models), "--episodes", "0"])
