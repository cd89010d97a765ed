"""MAML meta-batch throughput, measured in one run (prints JSON).

    python bench/maml_throughput.py [--family point_goal] [--tasks 20] [--rollouts 10] [--horizon 50]

* raw: batched env stepping alone (tasks x rollouts copies, random actions);
* batched: the sampling phase of one meta-iteration for the whole meta-batch at once: episodes of
  theta0, the inner steps of every task, the episodes of the adapted policies (one batched env of
  tasks x rollouts copies, policies stacked over tasks);
* loop: the same work as a Python loop over tasks (one task's rollouts at a time).

Env steps count the steps of the sampled episodes (the rollouts stop once every episode of the batch
has ended, so a family that terminates early, cart-pole, steps less than horizon x copies). Ratios
are what to read: batched / loop (target >= 5) and batched / raw. ``meta_iteration_seconds`` is a
whole batched meta-iteration (sampling plus the TRPO outer step), for context.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pipeline.config import load_params
from pipeline.envs.tasks import make_env, sample_tasks
from pipeline.maml.learner import MamlLearner, init_theta, policy_spec, sample_adaptation


def raw_env_steps_per_second(family: str, tasks: list[dict], seconds: float = 3.0) -> float:
    env = make_env(family, tasks)
    generator = torch.Generator().manual_seed(0)
    env.reset(torch.rand(env.num_envs, env.noise_dim, generator=generator))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if env.discrete:
            actions = torch.randint(env.action_dim, (env.num_envs,), generator=generator)
        else:
            actions = torch.rand(env.num_envs, env.action_dim, generator=generator) * 2 - 1
        env.step(actions, torch.rand(env.num_envs, env.noise_dim, generator=generator))
        steps += env.num_envs
    return steps / (time.perf_counter() - start)


def timed(function) -> tuple[float, int]:
    """(seconds, env steps) of one call of ``function``, which returns the env steps it sampled."""
    start = time.perf_counter()
    steps = function()
    return time.perf_counter() - start, steps


def rate(function, repeats: int) -> float:
    """Median env steps per second over ``repeats`` calls."""
    return statistics.median(steps / seconds for seconds, steps in (timed(function) for _ in range(repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--family", default=None, help="default: maml.family")
    parser.add_argument("--tasks", type=int, default=None, help="default: maml.meta_batch_size")
    parser.add_argument("--rollouts", type=int, default=None, help="default: maml.rollouts_per_task")
    parser.add_argument("--horizon", type=int, default=None, help="default: maml.horizon")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each; medians reported")
    args = parser.parse_args()

    base = load_params(args.params).maml
    overrides = {
        "family": args.family,
        "meta_batch_size": args.tasks,
        "rollouts_per_task": args.rollouts,
        "horizon": args.horizon,
    }
    config = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if config.threads:
        torch.set_num_threads(config.threads)  # as the stage runs
    family, n = config.family, config.rollouts_per_task
    tasks = sample_tasks(family, "train", config.meta_batch_size, 0)
    spec = policy_spec(family, config)
    theta = init_theta(spec, 0)
    generator = torch.Generator().manual_seed(0)

    def sampled_steps(task_list: list[dict]) -> int:
        episodes, _ = sample_adaptation(spec, config, theta, family, task_list, config.inner_steps, generator)
        return sum(e.env_steps() for e in episodes)

    def batched() -> int:
        return sampled_steps(tasks)

    def loop() -> int:
        return sum(sampled_steps([task]) for task in tasks)

    batched(), loop()  # warm-up: first-call imports and allocations
    batched_rate, loop_rate = rate(batched, args.repeats), rate(loop, args.repeats)
    batched_seconds = statistics.median(timed(batched)[0] for _ in range(args.repeats))
    raw = raw_env_steps_per_second(family, [t for t in tasks for _ in range(n)])
    learner = MamlLearner(config, tasks, seed=0)
    learner.step()
    meta_iteration_seconds = statistics.median(learner.step()["seconds"] for _ in range(args.repeats))

    result = {
        "family": family,
        "tasks": len(tasks),
        "rollouts_per_task": n,
        "horizon": config.horizon,
        "inner_steps": config.inner_steps,
        "policy_hidden": list(config.policy_hidden),
        "raw_env_steps_per_second": raw,
        "batched_env_steps_per_second": batched_rate,
        "loop_env_steps_per_second": loop_rate,
        "batched_over_loop": batched_rate / loop_rate,
        "batched_over_raw": batched_rate / raw,
        "meta_iteration_seconds": meta_iteration_seconds,
        "sampling_share_of_meta_iteration": batched_seconds / meta_iteration_seconds,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
