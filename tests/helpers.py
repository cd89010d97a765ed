"""Helpers shared by several test modules: subprocesses against a temporary store, simulated kills."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# A maml section small enough for a stage run in seconds (tests of the stage, its resume and its faults).
TINY_MAML = dict(
    iterations=4,
    meta_batch_size=3,
    rollouts_per_task=3,
    horizon=10,
    policy_hidden=[16],
    checkpoint_every=2,
    eval_tasks=2,
    eval_inner_steps=1,
    device="cpu",
)


def store_env(folder: Path, **extra: str) -> dict[str, str]:
    """This process's environment with the MLflow store ``folder/mlflow.db``, no DVC analytics, and no
    DVC_ROOT (which would point DVC at the project instead of ``folder``)."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }
    env.pop("DVC_ROOT", None)
    return env


def run_python(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd`` with exactly ``env``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def killed_at_call(monkeypatch, cls: type, method: str, call: int, body: Callable[[], object]) -> None:
    """Run ``body`` while ``cls.method`` raises at its ``call``-th call (a simulated kill of the
    process), check that the kill happened, and restore the method."""
    original, calls = getattr(cls, method), [0]

    def dies_at_the_call(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, dies_at_the_call)
    with pytest.raises(RuntimeError, match="simulated kill"):
        body()
    monkeypatch.setattr(cls, method, original)


def stage_project(folder: Path, monkeypatch, config) -> Path:
    """``folder`` as the project of a stage run in this process (its cwd and its own MLflow store),
    with the tasks prepared from ``config``; returns the tasks file."""
    from pipeline.io import write_json
    from pipeline.prepare import task_splits

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.chdir(folder)
    return write_json(folder / "tasks.json", task_splits(config.prepare, config.seed))
