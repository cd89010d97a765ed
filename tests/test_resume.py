"""Faults injected into real stage processes: ``kill -9`` between checkpoints and in the middle of a
checkpoint write, SIGTERM, a truncated checkpoint. After each, a plain rerun resumes, and the outputs
are bit for bit those of an uninterrupted run, in the same MLflow run (a FINISHED run is never
reopened). Plus the Checkpointer's own contract, in process."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from epg_helpers import with_tiny_evolve
from helpers import TINY_MAML
from test_metagrad_training import ROOT, run_stage

from pipeline import stage as stage_module
from pipeline.config import PipelineConfig
from pipeline.io import read_json, torch_load, write_json
from pipeline.stage import STAGE_SOURCES, Checkpointer, code_fingerprint, stopping_on_signals

SIGKILL_STATUS, SIGTERM_STATUS = -9, 143  # subprocess reports death by a signal as -signum

GENERATIONS = 6  # evolve: checkpoints after generations 2, 4 and 6 (checkpoint_every 2)
UPDATES = 8  # metagrad: 4 envs x 5 steps x 4 frames per update, checkpoints every 2 updates
ITERATIONS = 6  # maml: checkpoints after iterations 2, 4 and 6; two learner steps (MAML, pretrained) each
CALLS_PER_STEP = {"maml": 2}


def tiny_params(path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with_tiny_evolve(params, generations=GENERATIONS, checkpoint_every=2)
    params["metagrad"].update(
        games=["pong"],
        variants=["impala", "gamma_lambda"],  # the stage trains impala first, then gamma_lambda
        frames=UPDATES * 80,
        num_envs=4,
        unroll=5,
        checkpoint_every=2,
        log_every=1,
        device="cpu",
        env={"frameskip": 4, "stack": 4, "noop_max": 30, "max_episode_frames": 108000, "env_threads": 1},
    )
    params["maml"].update(TINY_MAML, iterations=ITERATIONS)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def call_fault(target: str, call: int, signal_name: str) -> str:
    """Prelude: the ``call``-th call of ``module:Class.method`` first sends the process ``signal_name``
    (call 0: never); the number of calls is printed to stderr at exit."""
    module, attribute = target.split(":")
    cls, method = attribute.split(".")
    return f"""
import atexit, os, signal, sys
from {module} import {cls}
_original, _calls = {cls}.{method}, [0]
atexit.register(lambda: print(f"calls: {{_calls[0]}}", file=sys.stderr))
def _faulty(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == {call}:
        os.kill(os.getpid(), signal.{signal_name})
    return _original(self, *args, **kwargs)
{cls}.{method} = _faulty
"""


def kill_inside_checkpoint_write(checkpoint: str) -> str:
    """Prelude: kill -9 inside the first write that replaces ``checkpoint``, between renaming the old
    checkpoint to <stem>.previous.pt and renaming the new one into place."""
    previous = Path(checkpoint).stem + ".previous.pt"
    return f"""
import os, signal
_replace = os.replace
def _replace_then_die(src, dst):
    _replace(src, dst)
    if str(dst).endswith("/{previous}"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = _replace_then_die
"""


STAGES = {
    # stage: (step patched by the faults, its call in the 4th step after the checkpoint of step 2 (metagrad
    # trains impala's 8 updates first), model file, curve files, checkpoint file, its counter)
    "evolve": (
        "pipeline.epg.problem:OpenAIES.step",
        4,
        "models/epg/loss.pt",
        ["plots/evolve/fitness.csv"],
        "checkpoints/evolve/evolve.pt",
        "generation",
    ),
    "metagrad": (
        "pipeline.metagrad.learner:MetaGradientLearner.update",
        UPDATES + 4,
        "models/metagrad/pong/gamma_lambda/seed0.pt",
        [
            "plots/metagrad/eta_pong_gamma_lambda_seed0.csv",
            "plots/metagrad/returns_pong_gamma_lambda_seed0.csv",
        ],
        "checkpoints/metagrad/pong/gamma_lambda/seed0.pt",
        "updates",
    ),
    "maml": (
        "pipeline.maml.learner:MamlLearner.step",
        2 * 3 + 1,  # MAML's step of the 4th iteration (the pretrained baseline steps after it)
        "models/maml/policy.pt",
        ["plots/maml/returns.csv"],
        "checkpoints/maml/maml.pt",
        "iteration",
    ),
}
MORE_MODELS = {"maml": ["models/maml/pretrained.pt"]}
TIMING_COLUMNS = {"env_steps_per_second", "seconds"}  # wall-clock figures differ between any two runs


class Project:
    """A params file, an MLflow store and output folders of one test."""

    def __init__(self, folder: Path, stage: str):
        self.folder, self.stage = folder, stage
        self.work = folder / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.params = tiny_params(folder / "params.yaml")

    def output_root(self, name: str) -> Path:
        root = self.folder / name
        if self.stage in ("evolve", "maml") and not (root / "data/prepared/tasks.json").exists():
            from pipeline.prepare import task_splits

            config = PipelineConfig.model_validate(yaml.safe_load(self.params.read_text()))
            write_json(root / "data/prepared/tasks.json", task_splits(config.prepare, config.seed))
        return root

    def run(self, root: Path, prelude: str = "", expect: int = 0):
        done = run_stage(self.params, root, self.work, stage=self.stage, prelude=prelude)
        assert done.returncode == expect, done.stderr[-3000:]
        return done

    def run_status(self, run_id: str) -> str:
        with sqlite3.connect(self.work / "mlflow.db") as db:
            return db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0]

    def run_id(self, root: Path) -> str:
        return read_json(root / "checkpoints" / self.stage / "run.json")["mlflow_run_id"]

    def checkpoint(self, root: Path) -> dict:
        return torch_load(root / STAGES[self.stage][4])


def curves(root: Path, files: list[str]) -> list[list[dict]]:
    tables = []
    for name in files:
        with open(root / name, newline="") as handle:
            tables.append(
                [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
            )
    return tables


def assert_same_outputs(first: Path, second: Path, stage: str) -> None:
    _, _, model, files, _, _ = STAGES[stage]
    for name in [model, *MORE_MODELS.get(stage, [])]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs"
    assert curves(first, files) == curves(second, files)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """stage -> (its Project, the output root of an uninterrupted run), run once per module."""
    runs = {}

    def get(stage: str) -> tuple[Project, Path]:
        if stage not in runs:
            project = Project(tmp_path_factory.mktemp(stage), stage)
            reference = project.output_root("reference")
            project.run(reference)
            runs[stage] = project, reference
        return runs[stage]

    return get


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["evolve", "metagrad", "maml"])
def test_killed_and_terminated_stage_resumes_to_the_uninterrupted_outputs(uninterrupted, stage):
    """One stage process after another: kill -9 between checkpoints, kill -9 inside a checkpoint write,
    SIGTERM (checkpoint, run KILLED, status 143), then a rerun that finishes: same bytes as an
    uninterrupted run, all in one MLflow run."""
    step, kill_call, _, _, checkpoint, counter = STAGES[stage]
    project, reference = uninterrupted(stage)
    root = project.output_root("faults")
    project.run(root, call_fault(step, kill_call, "SIGKILL"), expect=SIGKILL_STATUS)  # step 4, after ckpt 2
    run_id = project.run_id(root)
    assert project.checkpoint(root)[counter] == 2
    assert project.run_status(run_id) == "RUNNING"  # what kill -9 leaves behind

    project.run(root, kill_inside_checkpoint_write(checkpoint), expect=SIGKILL_STATUS)  # checkpoint 4
    folder = root / "checkpoints" / stage
    latest = root / checkpoint
    assert not latest.exists() and latest.with_name(f"{latest.stem}.previous.pt").exists()

    # resumes from the previous checkpoint (2); SIGTERM in its first step: checkpoint 3, then stop
    terminated = project.run(root, call_fault(step, 1, "SIGTERM"), expect=SIGTERM_STATUS)
    assert project.checkpoint(root)[counter] == 3, terminated.stderr[-3000:]
    assert project.run_status(run_id) == "KILLED"
    assert not list(folder.glob(".*.tmp")), "the write cut by kill -9 left its temporary file"

    finished = project.run(root, call_fault(step, 0, "SIGKILL"))
    steps = {"evolve": GENERATIONS, "metagrad": UPDATES, "maml": ITERATIONS}[stage]
    left = (steps - 3) * CALLS_PER_STEP.get(stage, 1)
    assert f"calls: {left}\n" in finished.stderr, "resumed from checkpoint 3, not started over"
    assert_same_outputs(reference, root, stage)
    metrics = read_json(root / "metrics" / f"{stage}.json")
    assert metrics["mlflow_run_id"] == run_id
    assert project.run_status(run_id) == "FINISHED"


@pytest.mark.e2e
def test_truncated_checkpoint_falls_back_and_never_reopens_the_finished_run(uninterrupted, tmp_path):
    """A finished evolve stage whose latest checkpoint is truncated: the rerun warns, naming the file,
    moves it aside, resumes from the previous checkpoint in a new MLflow run (the finished one, which
    registered a version, stays FINISHED) and writes the same loss file."""
    project, reference = uninterrupted("evolve")
    root = tmp_path / "out"
    shutil.copytree(reference, root)  # its run.json names the finished run of the reference
    first_run = project.run_id(root)
    latest = root / STAGES["evolve"][4]
    latest.write_bytes(latest.read_bytes()[:100])

    rerun = project.run(root)
    warnings = [line for line in rerun.stderr.splitlines() if "moved aside" in line]
    assert len(warnings) == 1 and str(latest) in warnings[0], rerun.stderr[-3000:]
    assert [p.name for p in latest.parent.glob("evolve.pt.corrupt-*")], "the bad file is kept"
    assert (root / "models/epg/loss.pt").read_bytes() == (reference / "models/epg/loss.pt").read_bytes()
    second_run = project.run_id(root)
    assert second_run != first_run
    assert project.run_status(first_run) == project.run_status(second_run) == "FINISHED"


# --------------------------------------------------------------------------------------------- Checkpointer
def test_checkpointer_keeps_the_previous_checkpoint_and_restores_rngs(tmp_path):
    checkpointer = Checkpointer(tmp_path / "loop.pt", key="k1")
    assert checkpointer.restore() is None  # nothing yet: start over
    torch.manual_seed(0)
    checkpointer.save({"step": 1})
    expected = torch.rand(3)  # the draw that follows the first checkpoint
    checkpointer.save({"step": 2})
    assert torch_load(checkpointer.previous)["step"] == 1 and torch_load(checkpointer.path)["step"] == 2

    checkpointer.path.unlink()  # e.g. killed between the two renames of a write
    torch.manual_seed(123)
    assert checkpointer.restore() == {"step": 1}
    assert torch.equal(torch.rand(3), expected), "the RNG continues where checkpoint 1 left it"

    assert Checkpointer(tmp_path / "loop.pt", key="k2").restore() is None  # other params or code


def test_checkpointer_moves_an_unreadable_checkpoint_aside(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path / "loop.pt", key="k")
    checkpointer.save({"step": 1})
    checkpointer.save({"step": 2})
    checkpointer.path.write_bytes(checkpointer.path.read_bytes()[:64])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert checkpointer.restore() == {"step": 1}
    moved = list(tmp_path.glob("loop.pt.corrupt-*"))
    assert len(moved) == 1 and len(moved[0].read_bytes()) == 64
    assert any(str(checkpointer.path) in r.message and "moved aside" in r.message for r in caplog.records)

    checkpointer.previous.write_bytes(b"not a checkpoint")  # both bad: start over
    assert checkpointer.restore() is None
    assert not checkpointer.previous.exists() and len(list(tmp_path.glob("*.corrupt-*"))) == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_at_the_next_safe_point_then_exits_128_plus_signum(tmp_path, signum):
    checkpointer = Checkpointer(tmp_path / "loop.pt", key="k")
    handler = signal.getsignal(signum)
    steps = []
    with pytest.raises(SystemExit) as stopped:
        with stopping_on_signals(), checkpointer.deferring_stop():
            for step in range(1, 10):
                if step == 3:
                    os.kill(os.getpid(), signum)  # arrives inside step 3, which still completes
                steps.append(step)
                checkpointer.safe_point(lambda step=step: {"step": step}, due=step % 5 == 0)
    assert stopped.value.code == 128 + signum
    assert steps == [1, 2, 3] and checkpointer.restore() == {"step": 3}  # off the every-5 schedule
    assert signal.getsignal(signum) is handler

    with pytest.raises(SystemExit) as stopped:  # outside a training loop: stop at once
        with stopping_on_signals():
            os.kill(os.getpid(), signum)
            steps.append("after the signal")
    assert stopped.value.code == 128 + signum and steps[-1] == 3


def test_loss_file_is_the_same_for_the_same_phi_under_another_commit(tmp_path, monkeypatch):
    """loss.pt holds content only: the git commit goes to the registry tags, not into the file."""
    from mlflow import MlflowClient

    from pipeline.epg import evolve as evolve_module
    from pipeline.prepare import task_splits

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(tiny_params(tmp_path / "params.yaml").read_text())
    params["evolve"]["generations"] = 2
    config = PipelineConfig.model_validate(params)
    tasks = write_json(tmp_path / "tasks.json", task_splits(config.prepare, config.seed))
    losses = []
    for commit in ("1" * 40, "2" * 40):
        monkeypatch.setattr(evolve_module, "git_state", lambda commit=commit: (commit, False))
        folder = tmp_path / commit[:1]
        metrics = evolve_module.run_evolve(
            config, tasks, folder / "loss.pt", folder / "m.json", folder / "plots", folder / "checkpoints"
        )
        losses.append((folder / "loss.pt").read_bytes())
        version = MlflowClient().get_model_version(
            config.tracking.registered_model, metrics["registered_version"]
        )
        assert version.tags["git_commit"] == commit
    assert losses[0] == losses[1]


def test_checkpoints_are_keyed_by_the_code_of_the_stages_computation_only(tmp_path):
    """A change to a stage's computation invalidates its checkpoints; a change elsewhere keeps them."""
    package = Path(stage_module.__file__).resolve().parent
    for stage, sources in STAGE_SOURCES.items():
        missing = [source for source in sources if not (package / source).exists()]
        assert not missing, f"STAGE_SOURCES[{stage!r}] names missing sources {missing}"
    copy = tmp_path / "pipeline"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: code_fingerprint(stage, copy) for stage in STAGE_SOURCES}
    assert before == {stage: code_fingerprint(stage) for stage in STAGE_SOURCES}
    assert len(set(before.values())) == len(before)

    (copy / "evaluation/report.py").write_text("# a report change\n", encoding="utf-8")
    (copy / "metagrad/grid.py").write_text("# orchestration\n", encoding="utf-8")
    assert {stage: code_fingerprint(stage, copy) for stage in STAGE_SOURCES} == before

    with (copy / "rl/returns.py").open("a", encoding="utf-8") as file:
        file.write("\n# a change to the shared returns\n")
    after = {stage: code_fingerprint(stage, copy) for stage in STAGE_SOURCES}
    assert all(after[stage] != before[stage] for stage in STAGE_SOURCES)
    with pytest.raises(ValueError, match="no source list for stage 'prepare'"):
        code_fingerprint("prepare")
