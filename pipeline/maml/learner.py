"""The MAML meta-learner: sample a meta-batch of tasks, adapt, and take one TRPO step on theta0.

One meta-iteration: T tasks are drawn from the training pool; one batched env holds their T x N
copies; the K inner steps' episodes and the post-adaptation episodes are sampled in turn, each by the
policies adapted so far (all T at once); then TRPO updates theta0 on the post-adaptation surrogate,
differentiating through the K inner steps (second order unless ``first_order``). Every random number
comes from CPU generators (episode noise, meta-batch tasks), so a run is reproducible and a checkpoint
resumes it exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from itertools import islice

import torch

from ..config import MamlConfig
from ..envs.tasks import FAMILIES, make_env
from ..rl import policy as pol
from .meta import MetaBatch, expand_tasks, inner_step, meta_objective
from .sampling import Episodes, sample_episodes, task_rows
from .trpo import trpo_step


def policy_spec(family: str, config: MamlConfig) -> pol.PolicySpec:
    env_class = FAMILIES[family]
    return pol.PolicySpec(
        env_class.obs_dim,
        env_class.action_dim,
        env_class.discrete,
        tuple(config.policy_hidden),
        config.init_log_std,
    )


def init_theta(spec: pol.PolicySpec, seed: int, device="cpu") -> dict:
    """theta0: one policy, leaves with a leading dimension of 1."""
    generator = torch.Generator().manual_seed(int(seed))
    return {name: value.to(device) for name, value in pol.init_policy(spec, 1, generator).items()}


def adaptation_stream(
    spec: pol.PolicySpec,
    config: MamlConfig,
    theta0: dict,
    family: str,
    tasks: list[dict],
    generator: torch.Generator,
    device="cpu",
) -> Iterator[tuple[Episodes, dict]]:
    """``(episodes, params)`` after 0, 1, 2, ... inner steps from theta0 on every task: ``params`` are
    the stacked ``[T, ...]`` policies (detached) and ``episodes`` the N rollouts per task they sampled.
    One batched env of len(tasks) x N copies, in theta0's dtype; the next inner step is only computed
    when the next pair is asked for."""
    copies = [task for task in tasks for _ in range(config.rollouts_per_task)]
    env = make_env(family, copies, dtype=next(iter(theta0.values())).dtype, device=device)
    sample = partial(
        sample_episodes,
        spec,
        env,
        rollouts_per_task=config.rollouts_per_task,
        horizon=config.horizon,
        generator=generator,
        gamma=config.gamma,
        normalize_advantages=config.normalize_advantages,
    )
    params = expand_tasks(theta0, len(tasks))
    while True:
        episodes = sample(params)
        yield episodes, params
        step = inner_step(spec, params, episodes, config.inner_lr, True)
        params = {name: value.detach() for name, value in step.items()}


def sample_adaptation(
    spec: pol.PolicySpec,
    config: MamlConfig,
    theta0: dict,
    family: str,
    tasks: list[dict],
    inner_steps: int,
    generator: torch.Generator,
    device="cpu",
) -> tuple[list[Episodes], dict]:
    """Episodes of theta0 and of the policies after 1..``inner_steps`` inner steps on every task:
    ``inner_steps + 1`` episode sets and the adapted policies (see :func:`adaptation_stream`)."""
    stream = adaptation_stream(spec, config, theta0, family, tasks, generator, device)
    pairs = list(islice(stream, inner_steps + 1))
    return [episodes for episodes, _ in pairs], pairs[-1][1]


def meta_batch(spec: pol.PolicySpec, episodes: list[Episodes], adapted: dict) -> MetaBatch:
    """The last episode set is the post-adaptation data; the others feed the inner steps."""
    valid = episodes[-1]
    with torch.no_grad():
        old_head = pol.policy_head(spec, adapted, task_rows(valid.obs))
    return MetaBatch(tuple(episodes[:-1]), valid, old_head)


class MamlLearner:
    """theta0 and the generators of one MAML run; :meth:`step` is one meta-iteration.

    ``adapt=False`` is the MAML paper's "pretrained" baseline: the same TRPO step on the same
    meta-batches, without inner steps, so it maximises the return of theta0 itself on all training
    tasks jointly. Learners built with the same seed start from the same theta0 and draw the same
    sequence of meta-batches (tasks come from their own generator, apart from the episode noise).
    """

    def __init__(
        self, config: MamlConfig, train_tasks: list[dict], seed: int, device="cpu", adapt: bool = True
    ):
        if not train_tasks:
            raise ValueError("MAML needs at least one training task")
        self.config, self.train_tasks, self.device = config, train_tasks, torch.device(device)
        self.inner_steps = config.inner_steps if adapt else 0
        self.spec = policy_spec(config.family, config)
        self.theta = init_theta(self.spec, seed, self.device)
        self.generator = torch.Generator().manual_seed(int(seed) + 1)
        self.task_generator = torch.Generator().manual_seed(int(seed) + 2)

    def sample_tasks(self) -> list[dict]:
        """``meta_batch_size`` tasks of the training pool: without replacement while the pool allows."""
        pool, size = len(self.train_tasks), self.config.meta_batch_size
        if size <= pool:
            index = torch.randperm(pool, generator=self.task_generator)[:size]
        else:
            index = torch.randint(pool, (size,), generator=self.task_generator)
        return [self.train_tasks[i] for i in index.tolist()]

    def step(self) -> dict[str, float]:
        """One meta-iteration; returns its metrics."""
        config, spec = self.config, self.spec
        started = time.perf_counter()
        episodes, adapted = sample_adaptation(
            spec,
            config,
            self.theta,
            config.family,
            self.sample_tasks(),
            self.inner_steps,
            self.generator,
            self.device,
        )
        sampled = time.perf_counter()
        batch = meta_batch(spec, episodes, adapted)

        def objective(theta: dict):
            surrogate, kl = meta_objective(spec, theta, batch, config.inner_lr, config.first_order)
            return surrogate.mean(), kl.mean()

        result = trpo_step(
            objective,
            self.theta,
            config.max_kl,
            config.cg_iterations,
            config.cg_damping,
            config.line_search_steps,
            config.line_search_backtrack,
        )
        self.theta = {name: value.detach().clone() for name, value in result.params.items()}
        env_steps = sum(e.env_steps() for e in episodes)
        finished = time.perf_counter()
        return {
            "pre_adaptation_return": float(episodes[0].task_returns().mean()),
            "post_adaptation_return": float(episodes[-1].task_returns().mean()),
            "kl": result.kl,
            "surrogate_gain": result.surrogate_after - result.surrogate_before,
            "line_search_steps": result.line_search_steps,
            "step_accepted": float(result.accepted),
            "env_steps": env_steps,
            "env_steps_per_second": env_steps / (sampled - started),
            "seconds": finished - started,
        }

    def state(self) -> dict:
        return {
            "theta": {k: v.cpu() for k, v in self.theta.items()},
            "generator": self.generator.get_state(),
            "task_generator": self.task_generator.get_state(),
        }

    def load_state(self, state: dict) -> None:
        self.theta = {k: v.to(self.device) for k, v in state["theta"].items()}
        self.generator.set_state(state["generator"])
        self.task_generator.set_state(state["task_generator"])


def adaptation_returns(
    spec: pol.PolicySpec,
    config: MamlConfig,
    theta0: dict,
    tasks: list[dict],
    inner_steps: int,
    seed: int,
    device="cpu",
) -> list[float]:
    """Mean episode return over ``tasks`` after 0, 1, ..., ``inner_steps`` inner steps from theta0."""
    generator = torch.Generator().manual_seed(int(seed))
    episodes, _ = sample_adaptation(
        spec, config, theta0, config.family, tasks, inner_steps, generator, device
    )
    return [float(e.task_returns().mean()) for e in episodes]
