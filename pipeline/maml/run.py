"""The ``maml`` stage: meta-train a policy initialisation with MAML, checkpointed, tracked, registered.

One MLflow run per invocation (continued after a kill, as the evolve stage does). Each iteration takes
one TRPO step of MAML and one of the "pretrained" baseline of the MAML paper (the same learner without
inner steps: one policy trained on all training tasks jointly, on the same meta-batches); their
metrics go to the run (the baseline's under ``pretrained/``), and both learners are checkpointed
every ``checkpoint_every`` iterations through :class:`pipeline.stage.Checkpointer`. At the end both
policies are evaluated on held-out test tasks after 0..``eval_inner_steps`` inner steps and written in
one format (``policy.pt`` and ``pretrained.pt``, what :func:`pipeline.maml.evaluation.adaptation_curves`
takes); the MAML policy is registered as a new version of the ``maml-policy`` model (alias
``candidate``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import registry, tracking
from ..config import PipelineConfig, params_hash, section_dict
from ..devices import resolve_device
from ..envs.tasks import load_tasks
from ..io import torch_save, write_csv, write_json
from ..plots import line_plot
from ..seeding import derived_seed
from ..stage import Checkpointer, loop_progress, resumable_stage_run
from .learner import MamlLearner, adaptation_returns

log = logging.getLogger(__name__)

POLICY_FORMAT_VERSION = 1
CHECKPOINT_FILE = "maml.pt"
REGISTERED_MODEL = "maml-policy"
POLICY_ARTIFACT_DIR = "maml_policy"
PRETRAINED = "pretrained"  # the baseline's name: its metric prefix, history and checkpoint entries
HISTORY_COLUMNS = [
    "iteration",
    "pre_adaptation_return",
    "post_adaptation_return",
    "pretrained_return",
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
    pretrained_path: Path,
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
        seed = derived_seed(config.seed, "maml", "train")
        learners = {
            "maml": MamlLearner(maml, tasks["train"], seed, device),
            PRETRAINED: MamlLearner(maml, tasks["train"], seed, device, adapt=False),
        }
        checkpointer = Checkpointer(checkpoint_dir / CHECKPOINT_FILE, resume_key)
        histories = train(learners, run, checkpointer)
        eval_tasks = tasks["test"][: maml.eval_tasks]
        test_returns = {
            name: adaptation_returns(
                learner.spec,
                maml,
                learner.theta,
                eval_tasks,
                maml.eval_inner_steps,
                derived_seed(config.seed, "maml", "eval"),
                device,
            )
            for name, learner in learners.items()
        }
        run.log_metric_series("test_return", test_returns["maml"], range(len(test_returns["maml"])))
        pretrained_test = test_returns[PRETRAINED]
        run.log_metric_series(f"{PRETRAINED}/test_return", pretrained_test, range(len(pretrained_test)))
        torch_save(pretrained_path, policy_record(config, learners[PRETRAINED], pretrained_test))
        run.log_artifact(pretrained_path, artifact_path="maml")
        history = merged_history(histories)
        version = write_outputs(
            config, run, learners["maml"], history, test_returns["maml"], policy_path, plots_dir
        )
        metrics = stage_metrics(config, history, test_returns, len(eval_tasks))
        metrics.update(
            registered_model=REGISTERED_MODEL, registered_version=version, mlflow_run_id=run.run_id
        )
        write_json(metrics_path, metrics)
        return metrics


def stage_metrics(config: PipelineConfig, history: list[dict], test_returns: dict, test_tasks: int) -> dict:
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "family": config.maml.family,
        "iterations": len(history),
        "first_post_adaptation_return": first.get("post_adaptation_return"),
        "last_pre_adaptation_return": last.get("pre_adaptation_return"),
        "last_post_adaptation_return": last.get("post_adaptation_return"),
        "last_pretrained_return": last.get("pretrained_return"),
        "test_tasks": test_tasks,
        "test_return_after_steps": {str(k): value for k, value in enumerate(test_returns["maml"])},
        "pretrained_test_return_after_steps": {
            str(k): value for k, value in enumerate(test_returns[PRETRAINED])
        },
        "env_steps_per_second": sum(r["env_steps_per_second"] for r in history) / max(1, len(history)),
    }


def log_row(run, name: str, row: dict) -> None:
    """MAML's metrics under their own names; the pretrained baseline's under ``pretrained/`` (its
    return is that of theta0 itself: no adaptation)."""
    metrics = {k: v for k, v in row.items() if k != "iteration"}
    if name == PRETRAINED:
        metrics["return"] = metrics.pop("pre_adaptation_return")
        del metrics["post_adaptation_return"]
        metrics = {f"{PRETRAINED}/{k}": v for k, v in metrics.items()}
    run.log_metrics(metrics, step=row["iteration"])


def train(learners: dict[str, MamlLearner], run, checkpointer: Checkpointer) -> dict[str, list[dict]]:
    """The meta-iterations not done yet (resumed from the checkpoint when its key matches), every
    learner one step per iteration, logged to ``run``, checkpointed every ``checkpoint_every``; returns
    each learner's history."""
    config = next(iter(learners.values())).config
    start, histories = 0, {name: [] for name in learners}
    state = checkpointer.restore()
    if state is not None:
        for name, learner in learners.items():
            learner.load_state(state["learners"][name])
        start, histories = state["iteration"], state["histories"]
        log.info("maml: resumed from %s at iteration %d", checkpointer.path, start)
        if state.get("mlflow_run_id") != run.run_id:  # a new run: it gets the curves so far as well
            for name, history in histories.items():
                for row in history:
                    log_row(run, name, row)

    def snapshot(next_iteration: int) -> dict:
        return {
            "iteration": next_iteration,
            "histories": histories,
            "learners": {name: learner.state() for name, learner in learners.items()},
            "mlflow_run_id": run.run_id,
        }

    progress = loop_progress("maml", "it", start, config.iterations)
    with checkpointer.deferring_stop(), progress:
        for iteration in progress:
            rows = {name: {"iteration": iteration, **learner.step()} for name, learner in learners.items()}
            for name, row in rows.items():
                histories[name].append(row)
                log_row(run, name, row)
            maml, pretrained = rows["maml"], rows[PRETRAINED]
            progress.set_postfix(
                pre=f"{maml['pre_adaptation_return']:.1f}",
                post=f"{maml['post_adaptation_return']:.1f}",
                pretrained=f"{pretrained['pre_adaptation_return']:.1f}",
                refresh=False,
            )
            log.info(
                "iteration %d: return %.2f -> %.2f after adaptation (kl %.4f, %d line-search steps); "
                "pretrained %.2f",
                iteration,
                maml["pre_adaptation_return"],
                maml["post_adaptation_return"],
                maml["kl"],
                maml["line_search_steps"],
                pretrained["pre_adaptation_return"],
            )
            due = (iteration + 1) % config.checkpoint_every == 0
            checkpointer.safe_point(lambda i=iteration: snapshot(i + 1), due=due)
        checkpointer.save(snapshot(config.iterations))
    return histories


def merged_history(histories: dict[str, list[dict]]) -> list[dict]:
    """MAML's rows with the pretrained baseline's return of the same iteration beside them."""
    return [
        {**row, "pretrained_return": baseline["pre_adaptation_return"]}
        for row, baseline in zip(histories["maml"], histories[PRETRAINED], strict=True)
    ]


def policy_record(config: PipelineConfig, learner: MamlLearner, test_returns: list[float]) -> dict:
    """The content of a policy file: theta0 and everything needed to run and adapt it (family, policy
    spec, the MAML hyperparameters), no git commit (same theta and config, same bytes)."""
    maml, spec = config.maml, learner.spec
    return {
        "format_version": POLICY_FORMAT_VERSION,
        "theta": learner.state()["theta"],
        "family": maml.family,
        "obs_dim": spec.obs_dim,
        "action_dim": spec.action_dim,
        "discrete": spec.discrete,
        "maml": maml.model_dump(mode="json"),
        "adapted_in_training": learner.inner_steps > 0,
        "test_returns": test_returns,
        "params_hash": params_hash(section_dict(config, "maml")),
        "seed": config.seed,
    }


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
    maml = config.maml
    policy = policy_record(config, learner, test_returns)
    commit, dirty = tracking.git_state()
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
            "params_hash": policy["params_hash"],
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
            "pretrained (no adaptation)": (iterations, [row["pretrained_return"] for row in history]),
        },
        xlabel="meta-iteration",
        ylabel="mean episode return (training tasks)",
        title="MAML: return before and after the inner steps",
    )
