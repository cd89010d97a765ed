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

        loss = {
            "format_version": LOSS_FORMAT_VERSION,
            "phi": best["phi"],
            **spec,
            "generation": best["generation"],
            "fitness": best["fitness"],
            "final_center": searcher.center.clone(),
            "params_hash": section_hash,
            "seed": config.seed,
        }  # content only (same phi and config, same bytes); the commit goes to the registry and the run
        torch_save(loss_path, loss)
        fitness_csv = write_csv(plots_dir / "fitness.csv", history, fieldnames=FITNESS_COLUMNS)
        fitness_png = plot_fitness(history, plots_dir / "fitness.png")
        for path in (loss_path, fitness_csv, fitness_png):
            run.log_artifact(path, artifact_path="evolve")
        version = register_evolved_loss(config, run, loss_path, best, section_hash)
        log.info("registered %s version %s (alias candidate)", config.tracking.registered_model, version)
        last = history[-1] if history else {}
        metrics = {
            "family": evolve.family,
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
            "mlflow_run_id": run.run_id,
        }
        write_json(metrics_path, metrics)
        return metrics


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
    evolve = config.evolve
    start, history = 0, []
    best = {"phi": phi_init.clone(), "fitness": -math.inf, "generation": -1}
    state = checkpointer.restore()
    if state is not None:
        searcher.load_state(state["searcher"])
        start, history, best = state["generation"], state["history"], state["best"]
        log.info("evolve: resumed from %s at generation %d", checkpointer.path, start)
        if state.get("mlflow_run_id") != run.run_id:  # a new run: it gets the curve so far as well
            for row in history:
                log_generation(run, row)

    def snapshot(next_generation: int) -> dict:
        return {
            "generation": next_generation,
            "searcher": searcher.state(),
            "history": history,
            "best": best,
            "mlflow_run_id": run.run_id,
        }

    progress = loop_progress("evolve", "gen", start, evolve.generations)
    with checkpointer.deferring_stop(), progress:
        for generation in progress:
            row = evolve_one_generation(evolve, generation, problem, searcher)
            if row["center"] > best["fitness"]:
                best = {"phi": problem.center.clone(), "fitness": row["center"], "generation": generation}
            row["best_so_far"] = best["fitness"]
            history.append(row)
            log_generation(run, row)
            progress.set_postfix(center=f"{row['center']:.1f}", best=f"{best['fitness']:.1f}", refresh=False)
            log.info(
                "generation %d: mean %.2f max %.2f center %.2f best %.2f (%.0f env steps/s)",
                generation,
                row["mean"],
                row["max"],
                row["center"],
                best["fitness"],
                row["env_steps_per_second"],
            )
            due = (generation + 1) % evolve.checkpoint_every == 0
            checkpointer.safe_point(lambda g=generation: snapshot(g + 1), due=due)
        checkpointer.save(snapshot(evolve.generations))
    return history, best


def evolve_one_generation(evolve, generation: int, problem: EPGProblem, searcher: OpenAIES) -> dict:
    """One ES step; returns the generation's row of the fitness curve (without best_so_far)."""
    lr = learning_rate(evolve, generation)
    searcher.set_learning_rate(lr)
    problem.set_generation(generation, center=None)
    started = time.perf_counter()
    searcher.step()
    seconds = time.perf_counter() - started
    evdata = searcher.population.access_evals()
    env_steps = float(evdata[:, 2].sum()) * (1 + 1 / len(evdata))  # members + the center
    return {
        "generation": generation,
        **population_stats(evdata[:, 0]),
        "center": float(problem.center_fitness),
        "nonfinite": int(evdata[:, 1].sum()),
        "sigma": float(searcher.sigma.mean()),
        "lr": lr,
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
