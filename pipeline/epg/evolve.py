"""The evolve stage: evolution strategies over the loss parameters phi (EPG, Algorithm 1).

Each generation: the searcher samples V perturbed losses phi + sigma * eps, the problem trains W fresh
policies with each (one batched inner loop) and returns their fitness, and the searcher follows the
ranked ES gradient with Adam. The center phi is evaluated alongside every generation on the same tasks;
the best center so far is the exported loss. Every ``checkpoint_every`` generations the whole state
(searcher, RNGs, history, best phi, MLflow run id) is checkpointed (``stage.Checkpointer``); a killed
stage resumes from it to the same phi. The exported loss file holds content only, so the same phi and
config give the same bytes; its provenance (git commit, run) is in the registry and the MLflow run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from ..config import PipelineConfig, params_hash, section_dict
from ..envs.tasks import load_tasks, make_env
from ..io import torch_save, write_csv, write_json
from ..plots import line_plot
from ..registry import register_loss
from ..seeding import derived_seed
from ..stage import Checkpointer, loop_progress, resumable_stage_run
from ..tracking import git_state
from .inner import loss_net_input_dim, policy_spec
from .loss_net import initial_phi
from .problem import EPGProblem, OpenAIES, learning_rate, ppo_weight

log = logging.getLogger(__name__)

LOSS_FORMAT_VERSION = 1
CHECKPOINT_FILE = "evolve.pt"
FITNESS_COLUMNS = [
    "generation",
    "mean",
    "median",
    "max",
    "min",
    "center",
    "best_so_far",
    "nonfinite",
    "sigma",
    "lr",
    "alpha",
    "env_steps_per_second",
]


def loss_spec(config: PipelineConfig, tasks: list[dict]) -> dict:
    """Everything needed to rebuild the loss network and its inner loop, stored beside phi."""
    evolve = config.evolve
    env = make_env(evolve.family, tasks[:1])
    spec = policy_spec(env, evolve.inner)
    return {
        "family": evolve.family,
        "input_dim": loss_net_input_dim(env, spec, evolve.loss_net.memory_units),
        "obs_dim": env.obs_dim,
        "action_dim": env.action_dim,
        "discrete": env.discrete,
        "loss_net": evolve.loss_net.model_dump(mode="json"),
        "inner": evolve.inner.model_dump(mode="json"),
    }


def population_stats(fitness: torch.Tensor) -> dict[str, float]:
    finite = fitness[torch.isfinite(fitness)]
    if finite.numel() == 0:
        return {"mean": -math.inf, "median": -math.inf, "max": -math.inf, "min": -math.inf}
    return {
        "mean": float(finite.mean()),
        "median": float(finite.median()),
        "max": float(finite.max()),
        "min": float(fitness.min()),
    }


def run_evolve(
    config: PipelineConfig,
    tasks_path: Path,
    loss_path: Path,
    metrics_path: Path,
    plots_dir: Path,
    checkpoint_dir: Path,
) -> dict:
    evolve = config.evolve
    section_hash = params_hash(section_dict(config, "evolve"))
    tasks = load_tasks(tasks_path, evolve.family)
    spec = loss_spec(config, tasks["train"])
    phi_init = initial_phi(spec["input_dim"], evolve.loss_net, derived_seed(config.seed, "phi_init"))

    with resumable_stage_run("evolve", config, checkpoint_dir) as (run, resume_key):
        torch.manual_seed(derived_seed(config.seed, "evolve"))
        problem = EPGProblem(evolve, tasks["train"], phi_init, seed=derived_seed(config.seed, "problem"))
        searcher = OpenAIES(problem, evolve, phi_init)
        # The center is evaluated with each batch, after the searcher's update and before evaluation.
        problem.before_eval_hook.append(lambda batch: setattr(problem, "center", searcher.center.clone()))
        checkpointer = Checkpointer(checkpoint_dir / CHECKPOINT_FILE, resume_key)
        try:
            history, best = evolve_generations(config, run, problem, searcher, checkpointer, phi_init)
        finally:
            if problem.actors:
                problem.kill_actors()

        write_evolve_outputs(config, run, spec, history, best, searcher.center, loss_path, plots_dir)
        version = register_evolved_loss(config, run, loss_path, best, section_hash)
        log.info("registered %s version %s (alias candidate)", config.tracking.registered_model, version)
        metrics = evolve_metrics(config, history, best, version, run.run_id)
        write_json(metrics_path, metrics)
        return metrics


def write_evolve_outputs(
    config: PipelineConfig,
    run,
    spec: dict,
    history: list[dict],
    best: dict,
    final_center: torch.Tensor,
    loss_path: Path,
    plots_dir: Path,
) -> None:
    """The exported loss (the best center) and the fitness curve, written and attached to the run."""
    loss = {
        "format_version": LOSS_FORMAT_VERSION,
        "phi": best["phi"],
        **spec,
        "generation": best["generation"],
        "fitness": best["fitness"],
        "final_center": final_center.clone(),
        "params_hash": params_hash(section_dict(config, "evolve")),
        "seed": config.seed,
    }  # content only (same phi and config, same bytes); the commit goes to the registry and the run
    torch_save(loss_path, loss)
    fitness_csv = write_csv(plots_dir / "fitness.csv", history, fieldnames=FITNESS_COLUMNS)
    fitness_png = plot_fitness(history, plots_dir / "fitness.png")
    for path in (loss_path, fitness_csv, fitness_png):
        run.log_artifact(path, artifact_path="evolve")


def evolve_metrics(
    config: PipelineConfig, history: list[dict], best: dict, version: str, run_id: str
) -> dict:
    """metrics/evolve.json: the curve's summary and where the loss was registered."""
    last = history[-1] if history else {}
    return {
        "family": config.evolve.family,
        "generations": len(history),
        "best_center_fitness": best["fitness"],
        "best_generation": best["generation"],
        "first_center_fitness": history[0]["center"] if history else None,
        "last_center_fitness": last.get("center"),
        "last_mean_fitness": last.get("mean"),
        "nonfinite_members": sum(row["nonfinite"] for row in history),
        "env_steps_per_second": sum(r["env_steps_per_second"] for r in history) / max(1, len(history)),
        "registered_model": config.tracking.registered_model,
        "registered_version": version,
        "mlflow_run_id": run_id,
    }


def register_evolved_loss(config: PipelineConfig, run, loss_path: Path, best: dict, section_hash: str) -> str:
    """A new registry version of ``loss_path``, tagged with its provenance (run, commit, params)."""
    commit, dirty = git_state()
    return register_loss(
        run,
        loss_path,
        config.tracking.registered_model,
        tags={
            "run_id": run.run_id,
            "family": config.evolve.family,
            "fitness": f"{best['fitness']:.4f}",
            "generation": best["generation"],
            "git_commit": commit,
            "git_dirty": str(dirty).lower(),
            "params_hash": section_hash,
        },
    )


def evolve_generations(
    config: PipelineConfig, run, problem: EPGProblem, searcher: OpenAIES, checkpointer: Checkpointer, phi_init
) -> tuple[list[dict], dict]:
    """Run the generations left after the checkpoint (if any); returns (history, best center)."""
    recorder = GenerationRecorder(config.evolve, run, problem, searcher, checkpointer, phi_init)
    recorder.restore()
    recorder.run()
    return recorder.history, recorder.best


class GenerationRecorder:
    """The evolve stage's bookkeeping around each ES step, as EvoTorch searcher hooks.

    ``before_step_hook`` sets the generation's learning rate and tasks; ``after_step_hook`` turns the
    evaluated population into the generation's row of the fitness curve (``ROW`` in the status) and
    keeps the best center; ``log_hook`` sends the row to MLflow, the log and the progress bar, then
    checkpoints when due (or stops at a pending SIGTERM); ``end_of_run_hook`` writes the final checkpoint.
    """

    ROW = "fitness_row"  # the status key of the row; PGPE's own status already has "center"

    def __init__(
        self, evolve, run, problem: EPGProblem, searcher: OpenAIES, checkpointer: Checkpointer, phi_init
    ):
        self.evolve, self.mlflow_run, self.problem, self.searcher = evolve, run, problem, searcher
        self.checkpointer = checkpointer
        self.generation = 0  # the next generation to run
        self.history: list[dict] = []
        self.best = {"phi": phi_init.clone(), "fitness": -math.inf, "generation": -1}
        self.started = 0.0
        self.progress = None

    def restore(self) -> None:
        """Continue from the checkpoint, if any; a new MLflow run gets the curve so far as well."""
        state = self.checkpointer.restore()
        if state is None:
            return
        self.searcher.load_state(state["searcher"])
        self.generation, self.history, self.best = state["generation"], state["history"], state["best"]
        log.info("evolve: resumed from %s at generation %d", self.checkpointer.path, self.generation)
        if state.get("mlflow_run_id") != self.mlflow_run.run_id:
            for row in self.history:
                log_generation(self.mlflow_run, row)

    def run(self) -> None:
        """The generations left, as one ``searcher.run``; SIGTERM waits for the next checkpoint."""
        evolve, start = self.evolve, self.generation
        progress = loop_progress("evolve", "gen", start, evolve.generations)  # updated by the log hook
        with self.checkpointer.deferring_stop(), progress:
            self.progress = progress
            self.attach()
            self.searcher.run(evolve.generations - start)

    def attach(self) -> None:
        searcher = self.searcher
        searcher.before_step_hook.append(self.before_step)
        searcher.after_step_hook.append(self.after_step)
        searcher.log_hook.append(self.log)
        searcher.log_hook.append(self.checkpoint)
        searcher.end_of_run_hook.append(lambda status: self.checkpointer.save(self.snapshot()))

    def snapshot(self) -> dict:
        return {
            "generation": self.generation,
            "searcher": self.searcher.state(),
            "history": self.history,
            "best": self.best,
            "mlflow_run_id": self.mlflow_run.run_id,
        }

    def before_step(self) -> None:
        self.searcher.set_learning_rate(learning_rate(self.evolve, self.generation))
        self.problem.set_generation(self.generation, center=None)
        self.started = time.perf_counter()

    def after_step(self) -> dict:
        seconds = time.perf_counter() - self.started
        row = generation_row(self.evolve, self.generation, self.problem, self.searcher, seconds)
        if row["center"] > self.best["fitness"]:
            self.best = {
                "phi": self.problem.center.clone(),
                "fitness": row["center"],
                "generation": row["generation"],
            }
        row["best_so_far"] = self.best["fitness"]
        self.history.append(row)
        self.generation += 1
        return {self.ROW: row}

    def log(self, status: dict) -> None:
        row = status[self.ROW]
        log_generation(self.mlflow_run, row)
        self.progress.update(1)
        self.progress.set_postfix(
            center=f"{row['center']:.1f}", best=f"{row['best_so_far']:.1f}", refresh=False
        )
        log.info(
            "generation %d: mean %.2f max %.2f center %.2f best %.2f (%.0f env steps/s)",
            row["generation"],
            row["mean"],
            row["max"],
            row["center"],
            row["best_so_far"],
            row["env_steps_per_second"],
        )

    def checkpoint(self, status: dict) -> None:
        due = self.generation % self.evolve.checkpoint_every == 0
        self.checkpointer.safe_point(self.snapshot, due=due)


def generation_row(evolve, generation: int, problem: EPGProblem, searcher: OpenAIES, seconds: float) -> dict:
    """The generation's row of the fitness curve (without best_so_far), from the evaluated population."""
    evdata = searcher.population.access_evals()
    env_steps = float(evdata[:, 2].sum()) * (1 + 1 / len(evdata))  # members + the center
    return {
        "generation": generation,
        **population_stats(evdata[:, 0]),
        "center": float(problem.center_fitness),
        "nonfinite": int(evdata[:, 1].sum()),
        "sigma": float(searcher.sigma.mean()),
        "lr": learning_rate(evolve, generation),
        "alpha": ppo_weight(evolve, generation),
        "env_steps_per_second": env_steps / seconds,
    }


def log_generation(run, row: dict) -> None:
    fitness_keys = ("mean", "median", "max", "min", "center", "best_so_far")
    run.log_metrics(
        {f"fitness/{k}" if k in fitness_keys else k: v for k, v in row.items() if k != "generation"},
        step=row["generation"],
    )


def plot_fitness(history: list[dict], target: Path) -> Path:
    generations = [row["generation"] for row in history]
    return line_plot(
        target,
        {
            "population mean": (generations, [row["mean"] for row in history]),
            "population max": (generations, [row["max"] for row in history]),
            "center": (generations, [row["center"] for row in history]),
            "best center so far": (generations, [row["best_so_far"] for row in history]),
        },
        xlabel="generation",
        ylabel="fitness (return after training)",
        title="EPG: fitness of the evolved loss",
    )
