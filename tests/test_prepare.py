"""End-to-end test of the prepare stage script (``stages/prepare.py``) on tiny params.

The stage runs as a subprocess with its cwd in a temporary folder holding its own ``dvc.yaml`` and
with ``MLFLOW_TRACKING_URI`` pointing at a temporary SQLite store, so that neither the project's
``mlflow.db`` nor a ``mlruns/`` folder in the project root is touched.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import run_python, store_env

from pipeline.envs.tasks import sample_tasks

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "stages" / "prepare.py"
SIZES = {"train": 5, "test": 3, "ood": 2}


def tiny_params(mutate=None) -> dict:
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["prepare"].update(
        games=["pong"],
        num_train_tasks=SIZES["train"],
        num_test_tasks=SIZES["test"],
        num_ood_tasks=SIZES["ood"],
    )
    data["metagrad"]["games"] = ["pong"]
    data["tracking"]["system_metrics"] = False
    if mutate is not None:
        mutate(data)
    return data


def run_stage(folder: Path, params: dict) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dvc.yaml").touch()
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = store_env(folder, PIPELINE_RUN_ID="test-prepare")
    args = [str(SCRIPT), "--params", str(params_file), "--output-root", "out"]
    return run_python(args, folder, env, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepare")
    result = run_stage(folder, tiny_params())
    assert result.returncode == 0, result.stderr
    return folder


def read(folder: Path, relative: str):
    return json.loads((folder / "out" / relative).read_text())


def test_prepare_writes_exactly_its_outputs(prepared):
    files = sorted(
        p.relative_to(prepared / "out").as_posix() for p in (prepared / "out").rglob("*") if p.is_file()
    )
    assert files == [
        "data/prepared/atari_scores.json",
        "data/prepared/envs.json",
        "data/prepared/tasks.json",
        "metrics/prepare.json",
    ]
    assert not (PROJECT / "out").exists()


def test_envs_json_describes_pong_and_the_task_families(prepared):
    envs = read(prepared, "data/prepared/envs.json")
    pong = envs["atari"]["pong"]
    assert list(envs["atari"]) == ["pong"]
    assert pong["game"] == "pong"
    assert pong["num_actions"] == 6
    assert pong["observation_shape"] == [4, 84, 84]
    assert pong["observation_dtype"] == "uint8"
    assert re.fullmatch(r"[0-9a-f]{32}", pong["rom_md5"])

    assert set(envs["task_families"]) == {"point_goal", "random_cartpole"}
    point_goal = envs["task_families"]["point_goal"]
    assert point_goal["discrete"] is False and point_goal["action_dim"] == 2
    cartpole = envs["task_families"]["random_cartpole"]
    assert cartpole["discrete"] is True and cartpole["action_dim"] == 2
    assert set(cartpole["param_ranges"]) == {"train", "test", "ood"}

    for name in ("ale-py", "gymnasium", "torch", "mlflow", "dvc", "numpy"):
        assert envs["versions"][name] == importlib.metadata.version(name)


def test_atari_scores_json_holds_the_57_game_table(prepared):
    scores = read(prepared, "data/prepared/atari_scores.json")
    games = scores["games"]
    assert len(games) == 57
    assert games["pong"] == {"random": -20.7, "human": 14.6}
    assert games["breakout"] == {"random": 1.7, "human": 30.5}
    assert all(set(v) == {"random", "human"} for v in games.values())
    assert "hns" in scores["formula"]


def test_tasks_json_has_splits_sized_from_params(prepared):
    tasks = read(prepared, "data/prepared/tasks.json")
    assert tasks["format_version"] == 1
    assert tasks["seed"] == 0
    assert set(tasks["families"]) == {"point_goal", "random_cartpole"}
    for family, data in tasks["families"].items():
        assert set(data) == {"param_ranges", "train", "test", "ood"}
        for split, size in SIZES.items():
            split_tasks = data[split]
            assert len(split_tasks) == size
            for index, task in enumerate(split_tasks):
                assert set(task) == {"task_id", "seed", "params"}
                assert task["task_id"] == f"{family}/{split}/{index}"
                assert isinstance(task["seed"], int)
            # the same draws as the library function, so evolve/evaluate can rely on them
            assert split_tasks == sample_tasks(family, split, size, 0)
    ood = tasks["families"]["point_goal"]["ood"]
    low, high = tasks["families"]["point_goal"]["param_ranges"]["ood"]["goal_angle"]
    assert all(low <= t["params"]["goal_angle"] < high for t in ood)


def test_metrics_json_points_at_a_finished_mlflow_run(prepared):
    metrics = read(prepared, "metrics/prepare.json")
    assert metrics["num_games"] == 1
    assert metrics["num_score_games"] == 57
    assert metrics["num_tasks"] == {"point_goal": SIZES, "random_cartpole": SIZES}

    from mlflow import MlflowClient

    mlclient = MlflowClient(tracking_uri=f"sqlite:///{prepared / 'mlflow.db'}")
    run = mlclient.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.stage"] == "prepare"
    assert run.data.tags["pipeline.run_id"] == "test-prepare"
    assert run.data.params["prepare.games"] == "['pong']"
    assert run.data.params["prepare.num_train_tasks"] == str(SIZES["train"])
    assert run.data.metrics == {"num_games": 1.0, "num_score_games": 57.0}
    artifacts = {f.path for f in mlclient.list_artifacts(run.info.run_id, "prepared")}
    assert artifacts == {"prepared/envs.json", "prepared/atari_scores.json", "prepared/tasks.json"}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["prepare"].update(games=["pongg"]), ["prepare.games", "did you mean pong"]),
        (lambda d: d["evolve"].update(popsize=-2), ["evolve.popsize = -2", "greater than or equal to 2"]),
    ],
    ids=["unknown-game", "bad-evolve-value"],
)
def test_bad_params_exit_2_before_writing_anything(tmp_path, mutate, expected):
    folder = tmp_path / "stage"
    result = run_stage(folder, tiny_params(mutate))
    assert result.returncode == 2
    assert "prepare: invalid params, nothing was run or written:" in result.stderr
    for text in expected:
        assert text in result.stderr
    assert not (folder / "out").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["dvc.yaml", "params.yaml"]  # no MLflow store either
