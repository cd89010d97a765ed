"""EPG's outer loop as an EvoTorch problem and searcher.

``EPGProblem`` maps a batch of loss parameter vectors phi to their fitness: each phi trains W fresh
policies (one per task) from scratch and its fitness is the mean over the W lifetimes (Algorithm 1).
The whole batch is ONE call to the vectorized inner loop. Every member of a generation meets the same
tasks and random numbers (common random numbers, derived from the seed and the generation), so the
ES gradient compares losses, not luck. With ``num_actors`` > 1 EvoTorch splits each batch over Ray
actors; the generation reaches them through EvoTorch's sync hooks.

``OpenAIES`` is EvoTorch's PGPE configured as the OpenAI-ES of the EPG paper: fixed sigma,
centered ranks, Adam with beta1 = 0, and L2 decay on phi: g = sum_i rank_i eps_i / V - l2 * phi.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from evotorch import Problem, SolutionBatch
from evotorch.algorithms import PGPE

from ..config import EvolveConfig
from ..devices import keep_freed_cpu_memory, resolve_device
from ..seeding import derived_seed
from .inner import LossSetting, run_lifetimes

log = logging.getLogger(__name__)

WORST_FITNESS = -float("inf")


def ppo_weight(config: EvolveConfig, generation: int) -> float:
    """alpha of (1 - alpha) L_phi + alpha L_PPO: 1 -> 0 linearly over the first fraction of generations."""
    horizon = config.ppo_anneal_fraction * config.generations
    if horizon <= 0:
        return 0.0
    return max(0.0, 1.0 - generation / horizon)


def learning_rate(config: EvolveConfig, generation: int) -> float:
    """Linear from lr_start to lr_end over the first lr_decay_fraction of generations, then flat."""
    horizon = max(1.0, config.lr_decay_fraction * config.generations)
    progress = min(1.0, generation / horizon)
    return config.lr_start + progress * (config.lr_end - config.lr_start)


class EPGProblem(Problem):
    """Maximise the post-training return of policies trained by L_phi."""

    def __init__(self, config: EvolveConfig, train_tasks: list[dict], phi_init: torch.Tensor, seed: int):
        self.config = config
        self.train_tasks = train_tasks
        self.base_seed = seed
        self.generation = 0
        self.center: torch.Tensor | None = None  # evaluated alongside the batch (same tasks and noise)
        self.center_fitness: float | None = None
        super().__init__(
            "max",
            solution_length=int(phi_init.numel()),
            initial_bounds=(-0.1, 0.1),
            dtype=torch.float32,
            num_actors=config.num_actors if config.num_actors > 1 else None,
            seed=seed,
            eval_data_length=2,  # per member: lifetimes that went non-finite, env steps taken
            store_solution_stats=False,
        )

    # EvoTorch 0.6's EvaluationActor calls problem.seed(...) on every remote copy of a seeded problem;
    # Problem itself only has manual_seed, so without this alias actors crash on start-up.
    def seed(self, seed: int) -> None:
        self.manual_seed(seed)

    # ---------------------------------------------------------------- what a generation means
    def set_generation(self, generation: int, center: torch.Tensor | None) -> None:
        self.generation = generation
        self.center = None if center is None else center.detach().clone()

    def tasks_for(self, generation: int) -> list[dict]:
        """W tasks from the training pool, the same for every member of the generation."""
        rng = np.random.default_rng(derived_seed(self.base_seed, "tasks", generation))
        pool = len(self.train_tasks)
        workers = self.config.workers
        indices = rng.choice(pool, size=workers, replace=workers > pool)
        return [self.train_tasks[i] for i in indices]

    def crn_seed(self, generation: int) -> int:
        return derived_seed(self.base_seed, "crn", generation)

    def evaluate_phis(self, phis: torch.Tensor, generation: int):
        """The batched inner loop for [n, dim] loss parameters at ``generation``."""
        return run_lifetimes(
            self.config.family,
            self.tasks_for(generation),
            self.config.inner,
            LossSetting("epg", phi=phis, alpha=ppo_weight(self.config, generation)),
            self.config.loss_net,
            self.crn_seed(generation),
            resolve_device(self.config.device, "evolve.device"),
        )

    # ---------------------------------------------------------------- EvoTorch hooks
    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        if not getattr(self, "_process_ready", False):  # once per process: here, or in each Ray actor
            if self.is_remote:  # each actor gets its share of the cores instead of all of them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, self.config.num_actors)))
            keep_freed_cpu_memory()
            self._process_ready = True
        phis = batch.values.detach().to(torch.float32)
        with_center = self.center is not None
        if with_center:
            phis = torch.cat([phis, self.center.unsqueeze(0)])
        result = self.evaluate_phis(phis, self.generation)
        fitness = result.fitness.mean(-1)  # -inf if any of the member's lifetimes went non-finite
        nonfinite = result.nonfinite.sum(-1).float()
        steps = torch.full_like(fitness, result.env_steps / len(phis))
        if with_center:
            self.center_fitness = float(fitness[-1])
            fitness, nonfinite, steps = fitness[:-1], nonfinite[:-1], steps[:-1]
        batch.set_evals(torch.stack([fitness, nonfinite, steps], dim=-1).to(batch.values.dtype))

    def _make_sync_data_for_actors(self):
        return {"generation": self.generation, "center": self.center}

    def _use_sync_data_from_main(self, received) -> None:
        self.generation = received["generation"]
        self.center = received["center"]

    def _make_sync_data_for_main(self):
        return self.center_fitness

    def _use_sync_data_from_actors(self, received: list) -> None:
        # Every actor that held a piece evaluated the same center with the same random numbers.
        values = [value for value in received if value is not None]
        self.center_fitness = values[0] if values else None


class OpenAIES(PGPE):
    """PGPE with a fixed sigma, centered ranks and Adam: the OpenAI-ES used by EPG, plus L2 decay."""

    def __init__(self, problem: EPGProblem, config: EvolveConfig, center_init: torch.Tensor):
        super().__init__(
            problem,
            popsize=config.popsize,
            center_learning_rate=config.lr_start,
            stdev_learning_rate=0.0,
            stdev_init=config.sigma,
            stdev_max_change=None,
            optimizer="adam",
            optimizer_config={"beta1": config.adam_beta1, "beta2": config.adam_beta2},
            ranking_method="centered",
            center_init=center_init,
            symmetric=config.antithetic,
        )
        self.l2 = config.l2

    def _update_distribution(self, gradients: dict):
        # EvoTorch's mu-gradient is sum_i w_i (x_i - mu) / n = sigma * sum_i w_i eps_i / n; EPG follows
        # sum_i w_i eps_i / n - l2 * mu, and never adapts sigma.
        mu, sigma = self._distribution.mu, self._distribution.sigma
        gradients = {"mu": gradients["mu"] / sigma - self.l2 * mu, "sigma": torch.zeros_like(sigma)}
        super()._update_distribution(gradients)

    @property
    def center(self) -> torch.Tensor:
        return self._distribution.mu

    @property
    def sigma(self) -> torch.Tensor:
        return self._distribution.sigma

    def set_learning_rate(self, lr: float) -> None:
        self._optimizer.contained_optimizer.param_groups[0]["lr"] = lr

    # ---------------------------------------------------------------- checkpointing
    def state(self) -> dict:
        population = self._population
        return {
            "mu": self._distribution.mu.clone(),
            "sigma": self._distribution.sigma.clone(),
            "optimizer": self._optimizer.contained_optimizer.state_dict(),
            "population_values": None if population is None else population.values.clone(),
            "population_evdata": None if population is None else population.access_evals().clone(),
            "first_iter": self._first_iter,
            "steps": self._steps_count,
            "problem_generator": self.problem.generator.get_state()
            if self.problem.has_own_generator
            else None,
        }

    def load_state(self, state: dict) -> None:
        self._distribution = self._distribution.modified_copy(mu=state["mu"], sigma=state["sigma"])
        self._optimizer.contained_optimizer.load_state_dict(state["optimizer"])
        if state["population_values"] is not None:
            population = SolutionBatch(self.problem, popsize=len(state["population_values"]), empty=True)
            population.set_values(state["population_values"])
            population.set_evals(state["population_evdata"])
            self._population = population
        self._first_iter = state["first_iter"]
        self._steps_count = state["steps"]
        if state["problem_generator"] is not None:
            self.problem.generator.set_state(state["problem_generator"])
