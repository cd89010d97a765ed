"""The ``maml`` stage: meta-train a policy initialisation with MAML, checkpointed, tracked, registered.

One MLflow run per invocation (continued after a kill, as the evolve stage does): per-iteration
metrics (pre- and post-adaptation return, KL, surrogate gain, line-search steps), a checkpoint of
theta0 and the generator every ``checkpoint_every`` iterations, then an evaluation on held-out test
tasks after 0..``eval_inner_steps`` inner steps. The policy file is registered as a new version of
the ``maml-policy`` model with the alias ``candidate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from .. import registry, tracking
from ..config import PipelineConfig, params_hash, section_dict
from ..devices import resolve_device
from ..envs.tasks import load_tasks
from ..io import torch_load, torch_save, write_csv, write_json
from ..plots import line_plot
from ..seeding import derived_seed
from ..stage import resumable_stage_run
from .learner import MamlLearner, adaptation_returns

log = logging.getLogger(__name__)

POLICY_FORMAT_VERSION = 1
CHECKPOINT_FILE = "maml.pt"
REGISTERED_MODEL = "maml-policy"
POLICY_ARTIFACT_DIR = "maml_policy"
HISTORY_COLUMNS = [
    "iteration",
    "pre_adaptation_return",
    "post_adaptation_return",
    "kl",
    "surrogate_gain",
    "line_search_steps",
    "step_accepted",
    "env_steps",
    "env_steps_per_second",
    "seconds",
]


def run_maml(
    config: PipelineConfig,
    tasks_path: Path,
    policy_path: Path,
    metrics_path: Path,
    plots_dir: Path,
    checkpoint_dir: Path,
) -> dict:
    maml = config.maml
    tasks = load_tasks(tasks_path, maml.family)
    device = resolve_device(maml.device, "maml.device")
    if maml.threads:
        torch.set_num_threads(maml.threads)
    with resumable_stage_run("maml", config, checkpoint_dir) as (run, resume_key):
        learner = MamlLearner(maml, tasks["train"], derived_seed(config.seed, "maml", "train"), device)
        history = train(learner, run, checkpoint_dir / CHECKPOINT_FILE, resume_key)
        eval_tasks = tasks["test"][: maml.eval_tasks]
        test_returns = adaptation_returns(
            learner.spec,
            maml,
            learner.theta,
            eval_tasks,
            maml.eval_inner_steps,
            derived_seed(config.seed, "maml", "eval"),
            device,
        )
        run.log_metric_series("test_return", test_returns, range(len(test_returns)))
        version = write_outputs(config, run, learner, history, test_returns, policy_path, plots_dir)
        metrics = {
            "family": maml.family,
            "iterations": len(history),
            "first_post_adaptation_return": history[0]["post_adaptation_return"] if history else None,
            "last_pre_adaptation_return": history[-1]["pre_adaptation_return"] if history else None,
            "last_post_adaptation_return": history[-1]["post_adaptation_return"] if history else None,
            "test_tasks": len(eval_tasks),
            "test_return_after_steps": {str(k): value for k, value in enumerate(test_returns)},
            "env_steps_per_second": sum(r["env_steps_per_second"] for r in history) / max(1, len(history)),
            "registered_model": REGISTERED_MODEL,
            "registered_version": version,
            "mlflow_run_id": run.run_id,
        }
        write_json(metrics_path, metrics)
        return metrics


def train(learner: MamlLearner, run, checkpoint_path: Path, resume_key: str) -> list[dict]:
    """The meta-iterations not done yet (resumed from ``checkpoint_path`` when it matches
    ``resume_key``), logged to ``run`` and checkpointed every ``checkpoint_every``; returns the history."""
    config = learner.config
    start, history = 0, []
    if checkpoint_path.exists():
        state = torch_load(checkpoint_path)
        if state["resume_key"] == resume_key:
            learner.load_state(state["learner"])
            start, history = state["iteration"], state["history"]
            log.info("maml: resumed from %s at iteration %d", checkpoint_path, start)

    def save_checkpoint(next_iteration: int) -> None:
        state = {"resume_key": resume_key, "iteration": next_iteration, "history": history}
        torch_save(checkpoint_path, {**state, "learner": learner.state()})

    progress = tqdm(
        range(start, config.iterations),
        desc="maml",
        unit="it",
        initial=start,
        total=config.iterations,
        disable=None,
    )
    for iteration in progress:
        row = {"iteration": iteration, **learner.step()}
        history.append(row)
        run.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
        progress.set_postfix(
            pre=f"{row['pre_adaptation_return']:.1f}", post=f"{row['post_adaptation_return']:.1f}"
        )
        log.info(
            "iteration %d: return %.2f -> %.2f after adaptation, kl %.4f, %d line-search steps",
            iteration,
            row["pre_adaptation_return"],
            row["post_adaptation_return"],
            row["kl"],
            row["line_search_steps"],
        )
        if (iteration + 1) % config.checkpoint_every == 0:
            save_checkpoint(iteration + 1)
    progress.close()
    save_checkpoint(config.iterations)
    return history


def write_outputs(
    config: PipelineConfig,
    run,
    learner: MamlLearner,
    history: list[dict],
    test_returns: list[float],
    policy_path: Path,
    plots_dir: Path,
) -> str:
    """The policy file, the returns CSV and plot, logged to ``run``; the policy registered as a new
    ``maml-policy`` version (alias ``candidate``), whose number is returned."""
    maml, spec = config.maml, learner.spec
    section_hash = params_hash(section_dict(config, "maml"))
    commit, dirty = tracking.git_state()
    policy = {
        "format_version": POLICY_FORMAT_VERSION,
        "theta": learner.state()["theta"],
        "family": maml.family,
        "obs_dim": spec.obs_dim,
        "action_dim": spec.action_dim,
        "discrete": spec.discrete,
        "maml": maml.model_dump(mode="json"),
        "test_returns": test_returns,
        "params_hash": section_hash,
        "seed": config.seed,
    }  # no git commit in the file: same theta and config give the same bytes (provenance is in the tags)
    torch_save(policy_path, policy)
    history_csv = write_csv(plots_dir / "returns.csv", history, fieldnames=HISTORY_COLUMNS)
    history_png = plot_returns(history, plots_dir / "returns.png")
    for path in (history_csv, history_png):
        run.log_artifact(path, artifact_path="maml")
    post = test_returns[min(maml.inner_steps, len(test_returns) - 1)]
    version = registry.register_file(
        run,
        policy_path,
        REGISTERED_MODEL,
        artifact_dir=POLICY_ARTIFACT_DIR,
        description="Policy initialisations meta-trained by MAML (pipeline maml stage).",
        tags={
            "run_id": run.run_id,
            "family": maml.family,
            "test_return_pre": f"{test_returns[0]:.4f}",
            "test_return_post": f"{post:.4f}",
            "git_commit": commit,
            "git_dirty": str(dirty).lower(),
            "params_hash": section_hash,
        },
    )
    log.info("registered %s version %s (alias candidate)", REGISTERED_MODEL, version)
    return version


def download_policy(uri: str, root: Path | None = None) -> bytes:
    """The bytes of a registered policy file, ``models:/maml-policy@candidate`` or ``.../3``."""
    return registry.download_file(uri, root=root)[1]


def plot_returns(history: list[dict], target: Path) -> Path:
    iterations = [row["iteration"] for row in history]
    return line_plot(
        target,
        {
            "before adaptation": (iterations, [row["pre_adaptation_return"] for row in history]),
            "after adaptation": (iterations, [row["post_adaptation_return"] for row in history]),
        },
        xlabel="meta-iteration",
        ylabel="mean episode return (training tasks)",
        title="MAML: return before and after the inner steps",
    )
