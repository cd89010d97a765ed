"""End to end, as a user runs it: `dvc repro` of all five stages in a fresh git repo with tiny params.

Checks: every stage ran; the evaluate metrics hold the promised figures; MLflow has one run per stage
sharing a pipeline-run id; the registry holds a loss version; a second `dvc repro` runs nothing;
changing an evolve param through `dvc exp run -S` reruns evolve and evaluate only; `dvc exp show`
lists the metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = [
    "pipeline",
    "stages",
    "params",
    "params.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
]

TINY = {
    "prepare": {"games": ["pong"], "num_train_tasks": 8, "num_test_tasks": 2, "num_ood_tasks": 2},
    "evolve": {
        "generations": 2,
        "popsize": 4,
        "workers": 2,
        "checkpoint_every": 1,
        "inner": {
            "lifetime_steps": 64,
            "update_every": 32,
            "buffer_size": 64,
            "minibatch_size": 16,
            "fitness_episodes": 1,
        },
        "loss_net": {"memory_units": 4},
    },
    "metagrad": {"frames": 1280, "num_envs": 4, "unroll": 4, "checkpoint_every": 2, "log_every": 1},
    "maml": {
        "iterations": 2,
        "meta_batch_size": 2,
        "rollouts_per_task": 2,
        "horizon": 10,
        "policy_hidden": [16],
        "checkpoint_every": 1,
        "eval_tasks": 2,
        "eval_inner_steps": 1,
    },
    "evaluate": {
        "epg": {"seeds": 2, "max_tasks_per_split": 2, "curve_points": 2},
        "atari": {"episodes": 2, "max_episode_frames": 2000},
    },
}


def deep_update(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def run(command: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {
        stage
        for stage in ("prepare", "evolve", "metagrad", "maml", "evaluate")
        if f"Running stage '{stage}'" in output
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        source = REPO / name
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(root),  # the copy's own `pipeline`, not the one installed from REPO
        "GIT_AUTHOR_NAME": "e2e",
        "GIT_AUTHOR_EMAIL": "e2e@example.com",
        "GIT_COMMITTER_NAME": "e2e",
        "GIT_COMMITTER_EMAIL": "e2e@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PIPELINE_RUN_ID", None)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny pipeline"], root, env)
    output = run(["dvc", "repro"], root, env)
    return root, {"env": env, "first_output": output}


def mlflow_runs(root: Path) -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


@pytest.mark.e2e
def test_dvc_repro_runs_every_stage(project):
    root, info = project
    assert stages_run(info["first_output"]) == {"prepare", "evolve", "metagrad", "maml", "evaluate"}
    for path in [
        "data/prepared/tasks.json",
        "models/epg/loss.pt",
        "models/metagrad/pong/impala/seed0.pt",
        "models/metagrad/pong/gamma_lambda/seed0.pt",
        "models/maml/policy.pt",
        "models/maml/pretrained.pt",
        "plots/maml/returns.csv",
        "reports/report.md",
        "plots/evolve/fitness.csv",
        "reports/curves_test.png",
        "reports/hns.png",
        "dvc.lock",
    ]:
        assert (root / path).exists(), path


@pytest.mark.e2e
def test_evaluate_metrics_hold_returns_cis_scores_and_hns(project):
    root, _ = project
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    for split in ("test", "ood"):
        for method in ("evolved", "ppo", "pg", "random_loss"):
            summary = metrics["epg"][split][method]
            assert summary["lifetimes"] == 4  # 2 seeds x 2 tasks
            assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    for variant in ("impala", "gamma_lambda"):
        row = metrics["atari"]["pong"][variant]
        assert -21 <= row["mean_score"] <= 21
        assert row["hns"] == pytest.approx((row["mean_score"] + 20.7) / (14.6 + 20.7))
        assert variant in metrics["median_hns"]
    assert metrics["promotion"]["promoted"] is True  # the first loss has no champion to beat
    seeds = json.loads((root / "reports/seeds_pong.json").read_text())  # the README table's source
    episodes = json.loads((root / "reports/atari_scores.json").read_text())["games"]["pong"]
    for variant in ("impala", "gamma_lambda"):
        cell = seeds[variant]["0"]  # one training seed: the variant's mean is that agent's mean
        assert cell["mean"] == metrics["atari"]["pong"][variant]["mean_score"]
        assert cell["episodes"] == len(episodes[variant]["seeds"]["0"]["scores"])
        # the milestones evaluate reads back from the metagrad stage's CSVs are the cell's own
        from pipeline.metagrad.milestones import cell_milestones
        from pipeline.metagrad.run import checkpoint_histories

        history = checkpoint_histories(root / "checkpoints/metagrad")["pong"][variant][0]
        assert cell["training"] == cell_milestones(history).to_dict()
        assert cell["training"]["frames_to_return"] == {"10": None, "18": None}  # a short run loses
    report = (root / "reports/report.md").read_text()
    assert "Median human-normalised score" in report and metrics["mlflow_run_id"] in report
    assert "| training return ≥ 10 / ≥ 18 by | γ / λ settled at |" in report


@pytest.mark.e2e
def test_mlflow_has_one_run_per_stage_sharing_a_pipeline_run_id_and_a_registered_loss(project):
    root, _ = project
    client, all_runs = mlflow_runs(root)
    runs = [run for run in all_runs if "mlflow.parentRunId" not in run.data.tags]
    by_stage = {run.data.tags["pipeline.stage"]: run for run in runs}
    assert set(by_stage) == {"prepare", "evolve", "metagrad", "maml", "evaluate"}
    assert len(runs) == 5
    cells = [
        run for run in all_runs if run.data.tags.get("mlflow.parentRunId") == by_stage["metagrad"].info.run_id
    ]
    assert sorted(run.data.tags["variant"] for run in cells) == ["gamma_lambda", "impala"]  # one per cell
    assert len(all_runs) == 7
    assert len({run.data.tags["pipeline.run_id"] for run in runs}) == 1
    for stage, run in by_stage.items():
        stage_metrics = json.loads((root / f"metrics/{stage}.json").read_text())
        assert stage_metrics["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
    versions = client.search_model_versions("name='epg-loss'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias("epg-loss", "champion").version == versions[0].version
    assert "heldout_return" in versions[0].tags
    maml_versions = client.search_model_versions("name='maml-policy'")
    assert len(maml_versions) == 1
    assert client.get_model_version_by_alias("maml-policy", "candidate").version == maml_versions[0].version


@pytest.mark.e2e
def test_second_repro_runs_nothing_and_an_evolve_change_reruns_evolve_and_evaluate_only(project):
    root, info = project
    env = info["env"]
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "first reproduction"], root, env)
    again = run(["dvc", "repro"], root, env)
    assert stages_run(again) == set()
    changed = run(["dvc", "exp", "run", "-S", "evolve.sigma=0.02"], root, env)
    assert stages_run(changed) == {"evolve", "evaluate"}
    shown = run(["dvc", "exp", "show", "--no-pager", "--md"], root, env)
    assert "evolve.sigma" in shown and "best_center_fitness" in shown
