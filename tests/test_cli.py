"""Tests for the ``python -m pipeline`` command line, run as subprocesses against temporary stores."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import run_python, store_env

from pipeline.config import ale_games, load_params

PROJECT = Path(__file__).resolve().parents[1]
MODEL = "cli-loss"  # tracking.registered_model in the store folder's params.yaml
PROMO = "promo-loss"  # a second model the promote test may change freely
PAYLOADS = {"1": b"first evolved loss", "2": b"second evolved loss"}


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    scratch = folder / "scratch"  # export leaves a downloaded copy in a temp folder
    scratch.mkdir(exist_ok=True)
    return run_python(["-m", "pipeline", *args], folder, store_env(folder, TMPDIR=str(scratch)), timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A project folder whose SQLite store holds two versions each of MODEL and PROMO.

    MODEL: version 1 (alias champion), version 2 (alias candidate); PROMO: the same layout.
    """
    folder = tmp_path_factory.mktemp("cli-store")
    (folder / "dvc.yaml").touch()
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["tracking"]["registered_model"] = MODEL
    (folder / "params.yaml").write_text(yaml.safe_dump(params))

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        from pipeline.registry import register_loss, set_alias
        from pipeline.tracking import StageRun

        for model in (MODEL, PROMO):
            for version, payload in PAYLOADS.items():
                loss = folder / "losses" / model / version / "loss.pt"
                loss.parent.mkdir(parents=True)
                loss.write_bytes(payload)
                with StageRun("evolve", {}, "h", experiment="cli-test") as run:
                    tags = {"fitness": f"{float(version) * 1.5:.2f}", "family": "point_goal"}
                    assert register_loss(run, loss, model, tags) == version
            set_alias(model, "1", "champion")
    return folder


def version_rows(stdout: str) -> dict[str, list[str]]:
    """``losses list`` output -> {version: [aliases, fitness, family, ...]} (header skipped)."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        fields = line.split()
        rows[fields[0]] = fields[1:]
    return rows


# ------------------------------------------------------------------------------------------ losses
def test_losses_list_shows_versions_aliases_and_tags(store):
    result = cli(store, "losses", "list")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["version", "aliases", "fitness", "family", "created", "run_id"]
    rows = version_rows(result.stdout)
    assert sorted(rows) == ["1", "2"]
    assert rows["1"][:3] == ["champion", "1.50", "point_goal"]
    assert rows["2"][:3] == ["candidate", "3.00", "point_goal"]
    assert len(rows["1"][-1]) == 32  # the MLflow run id


def test_losses_list_of_a_model_without_versions(store):
    result = cli(store, "losses", "--model", "nothing-here", "list")
    assert result.returncode == 0, result.stderr
    assert "no versions of 'nothing-here'" in result.stdout


def test_losses_show_by_alias_prints_json(store):
    result = cli(store, "losses", "show", "candidate")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["version"] == "2"
    assert row["aliases"] == ["candidate"]
    assert row["tags"] == {"fitness": "3.00", "family": "point_goal"}
    assert row["source"] == f"runs:/{row['run_id']}/evolved_loss"


def test_losses_export_writes_the_version_file(store, tmp_path):
    target = tmp_path / "champion.pt"
    result = cli(store, "losses", "export", "champion", str(target))
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == PAYLOADS["1"]
    assert f"exported {MODEL} version 1 to {target}" in result.stdout


def test_export_to_a_missing_folder_needs_parents(store, tmp_path):
    target = tmp_path / "exported" / "champion.pt"
    refused = cli(store, "losses", "export", "champion", str(target))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: folder {target.parent} does not exist (pass --parents to create it)"
    )
    assert not target.parent.exists()
    created = cli(store, "models", "export", MODEL, "champion", str(target), "--parents")
    assert created.returncode == 0, created.stderr
    assert target.read_bytes() == PAYLOADS["1"]


def test_losses_promote_moves_champion(store):
    result = cli(store, "losses", "--model", PROMO, "promote", "2")
    assert result.returncode == 0, result.stderr
    assert f"{PROMO} version 2 now has alias 'champion'" in result.stdout

    rows = version_rows(cli(store, "losses", "--model", PROMO, "list").stdout)
    assert rows["1"][0] == "-"
    assert rows["2"][0] == "candidate,champion"


@pytest.mark.parametrize(
    "args",
    [("show", "9"), ("export", "nope", "out.pt"), ("promote", "missing-alias")],
    ids=["show-unknown-number", "export-unknown-alias", "promote-unknown-alias"],
)
def test_losses_unknown_version_exits_2_with_message(store, args):
    result = cli(store, "losses", *args)
    assert result.returncode == 2
    what = f"version {args[1]}" if args[1].isdigit() else f"alias {args[1]!r}"
    assert result.stderr == f"error: '{MODEL}' has no {what}\n"
    assert result.stdout == ""
    assert not (store / "out.pt").exists()


# ------------------------------------------------------------------------------------------ models
def test_models_list_without_name_lists_every_registered_model(store):
    result = cli(store, "models", "list")
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert [line.split()[0] for line in lines] == sorted([MODEL, PROMO])
    assert f"{MODEL}  2 versions  " in result.stdout


def test_models_verbs_work_for_any_model_like_the_losses_alias(store):
    generic = cli(store, "models", "list", MODEL, "--tags", "fitness,family")
    alias = cli(store, "losses", "list")
    assert generic.returncode == alias.returncode == 0, generic.stderr + alias.stderr
    assert generic.stdout == alias.stdout
    shown = cli(store, "models", "show", MODEL, "2")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == json.loads(cli(store, "losses", "show", "candidate").stdout)


def test_models_list_default_columns_skip_long_ids(store):
    result = cli(store, "models", "list", MODEL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == [
        "version",
        "aliases",
        "fitness",
        "family",
        "created",
        "run_id",
    ]


def test_models_unknown_name_exits_2(store):
    result = cli(store, "models", "show", "no-such-model", "3")
    assert result.returncode == 2
    assert result.stderr.startswith("error: no registered model 'no-such-model' in sqlite:///")
    assert len(result.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------------ profile
@pytest.fixture
def project_copy(tmp_path) -> Path:
    folder = tmp_path / "project"
    shutil.copytree(PROJECT / "params", folder / "params")
    shutil.copyfile(PROJECT / "params.yaml", folder / "params.yaml")
    (folder / "dvc.yaml").touch()
    return folder


def test_profile_unknown_name_exits_2_listing_profiles(project_copy):
    before = (project_copy / "params.yaml").read_bytes()
    result = cli(project_copy, "profile", "no-such-profile")
    assert result.returncode == 2
    available = ", ".join(sorted(p.stem for p in (PROJECT / "params").glob("*.yaml")))
    assert "learn" in available
    assert f"error: no profile 'no-such-profile'; available: {available}" in result.stderr
    assert (project_copy / "params.yaml").read_bytes() == before


def test_profile_applies_the_overlay_to_params_yaml(project_copy):
    result = cli(project_copy, "profile", "learn")
    assert result.returncode == 0, result.stderr
    written = project_copy / "params.yaml"
    assert written.read_text().startswith("# profile: learn\n")
    assert load_params(written) == load_params(PROJECT / "params" / "learn.yaml")
    assert "params.yaml now holds the 'learn' profile" in result.stdout
    again = cli(project_copy, "profile", "learn")  # the same overlay twice changes nothing
    assert again.returncode == 0 and load_params(written) == load_params(PROJECT / "params" / "learn.yaml")
    refused = cli(project_copy, "profile", "paper")  # a different overlay is not stacked on top
    assert refused.returncode == 2 and "holds the 'learn' profile" in refused.stderr


def test_profile_with_invalid_params_is_refused(project_copy):
    broken = yaml.safe_load((PROJECT / "params.yaml").read_text())
    broken["evolve"]["popsiz"] = 4
    (project_copy / "params" / "broken.yaml").write_text(yaml.safe_dump(broken))
    before = (project_copy / "params.yaml").read_bytes()
    result = cli(project_copy, "profile", "broken")
    assert result.returncode == 2
    assert "evolve.popsiz: unknown key" in result.stderr
    assert (project_copy / "params.yaml").read_bytes() == before


# ------------------------------------------------------------------------------------------ games
def test_games_lists_ale_roms(tmp_path):
    (tmp_path / "dvc.yaml").touch()
    result = cli(tmp_path, "games")
    assert result.returncode == 0, result.stderr
    games = result.stdout.split()
    assert "pong" in games and "breakout" in games and "ms_pacman" in games
    assert games == sorted(games)
    assert games == list(ale_games())


def test_collapses_finds_near_uniform_stretches_of_a_cell_run(store, tmp_path):
    """A stage run with one cell run under it, whose logged entropy leaves ln 6 (Pong's 6 actions),
    comes back to it twice and ends just after the second time."""
    import math

    from pipeline import tracking

    uniform, learned = math.log(6), 0.5
    entropy = [uniform] * 3 + [learned] * 10 + [uniform] * 2 + [learned] * 10 + [uniform] * 3 + [learned]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        client = tracking.client()
        experiment = client.create_experiment("collapses-test")
        stage = client.create_run(experiment)
        cell = client.create_run(
            experiment,
            tags={"mlflow.parentRunId": stage.info.run_id, "game": "pong", "variant": "impala", "seed": "0"},
        )
        for update, value in enumerate(entropy, start=1):
            client.log_metric(cell.info.run_id, "entropy", value, step=320 * update)
    out = tmp_path / "collapses.json"
    result = cli(
        store, "collapses", stage.info.run_id, "--window", "1", "--merge-frames", "0", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "pong/impala/seed0" in result.stdout and "2 near-uniform stretches" in result.stdout
    cells = json.loads(out.read_text())["cells"]["pong"]["impala"]["0"]
    # updates 14-15 and 26-28 (frames 320 x update); the first three are the fresh policy, not an event
    assert [(e["start"], e["end"]) for e in cells["events"]] == [(4_480, 4_800), (8_320, 8_960)]
    assert cells["frames_since_collapse"] == 320 and cells["run_id"] == cell.info.run_id
    later = cli(
        store, "collapses", cell.info.run_id, "--window", "1", "--merge-frames", "0", "--after", "5000"
    )
    assert "1 near-uniform stretches" in later.stdout, later.stderr
    unknown = cli(store, "collapses", "0" * 32)
    assert unknown.returncode == 2 and "no MLflow run" in unknown.stderr
