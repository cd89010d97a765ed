"""EPG inner-loop throughput, measured in one run (prints JSON).

    python bench/epg_throughput.py [--members 16] [--workers 8] [--lifetime-steps 1024] [--device cuda]

* raw: batched env stepping alone (members x workers copies, random actions);
* vectorized: the inner loop for the whole population in one batched computation;
* loop: the same work as a Python loop over members (one member's W lifetimes at a time).

*_seconds_by_part: where the time went (acting, updates, fitness episodes; the loop's summed).

Env steps count every lifetime's steps, including the post-training fitness episodes. Ratios are
what to read: vectorized / loop (target >= 10) and vectorized / raw (target >= 0.15).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pipeline.config import load_params
from pipeline.devices import DEVICES, keep_freed_cpu_memory, resolve_device
from pipeline.envs.tasks import make_env, sample_tasks
from pipeline.epg.inner import LossSetting, loss_net_input_dim, policy_spec, run_lifetimes
from pipeline.epg.loss_net import initial_phi


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_env_steps_per_second(
    family: str, tasks: list[dict], device: torch.device, seconds: float = 3.0
) -> float:
    env = make_env(family, tasks, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    env.reset(uniform(env.num_envs, env.noise_dim))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if env.discrete:
            actions = torch.randint(env.action_dim, (env.num_envs,), generator=generator, device=device)
        else:
            actions = uniform(env.num_envs, env.action_dim) * 2 - 1
        env.step(actions, uniform(env.num_envs, env.noise_dim))
        steps += env.num_envs
    synchronize(device)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--lifetime-steps", type=int, default=None, help="default: evolve.inner.lifetime_steps"
    )
    parser.add_argument("--family", default=None, help="default: evolve.family")
    parser.add_argument(
        "--context-gradient",
        choices=["true", "false"],
        default=None,
        help="override evolve.loss_net.context_gradient",
    )
    parser.add_argument("--device", choices=DEVICES, default=None, help="default: evolve.device")
    parser.add_argument(
        "--skip-loop", action="store_true", help="no per-member loop (for populations where it takes hours)"
    )
    args = parser.parse_args()
    # As the evolve stage runs: raw stepping, vectorized and loop all measured under the same allocator.
    freed_memory_kept = keep_freed_cpu_memory()

    config = load_params(args.params).evolve
    if args.context_gradient is not None:
        loss_net = config.loss_net.model_copy(update={"context_gradient": args.context_gradient == "true"})
        config = config.model_copy(update={"loss_net": loss_net})
    family = args.family or config.family
    device = resolve_device(args.device or config.device, "--device" if args.device else "evolve.device")
    inner = config.inner
    if args.lifetime_steps:
        inner = inner.model_copy(update={"lifetime_steps": args.lifetime_steps})
    tasks = sample_tasks(family, "train", args.workers, 0)
    env = make_env(family, tasks[:1])
    dim = loss_net_input_dim(env, policy_spec(env, inner), config.loss_net.memory_units)
    phis = initial_phi(dim, config.loss_net, 0) + 0.01 * torch.randn(args.members, 1)

    raw = raw_env_steps_per_second(family, tasks * args.members, device)

    def lifetimes(member_phis: torch.Tensor, crn_seed: int):
        # The results come back on the CPU, so each call ends with the device's work done.
        return run_lifetimes(
            family, tasks, inner, LossSetting("epg", phi=member_phis), config.loss_net, crn_seed, device
        )

    lifetimes(phis[:1], 0)  # warm-up
    start = time.perf_counter()
    vectorized = lifetimes(phis, 1)
    vectorized_rate = vectorized.env_steps / (time.perf_counter() - start)

    loop_rate, loop_seconds = None, None
    if not args.skip_loop:
        start, loop_steps, loop_seconds = time.perf_counter(), 0, {}
        for member in range(args.members):
            alone = lifetimes(phis[member : member + 1], 1)
            loop_steps += alone.env_steps
            for part, seconds in alone.seconds.items():
                loop_seconds[part] = loop_seconds.get(part, 0.0) + seconds
        loop_rate = loop_steps / (time.perf_counter() - start)

    def rounded(seconds: dict | None) -> dict | None:
        return {part: round(value, 3) for part, value in seconds.items()} if seconds else None

    print(
        json.dumps(
            {
                "family": family,
                "members": args.members,
                "workers": args.workers,
                "lifetime_steps": inner.lifetime_steps,
                "update_every": inner.update_every,
                "buffer_size": inner.buffer_size,
                "context_gradient": config.loss_net.context_gradient,
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "torch_threads": torch.get_num_threads(),
                "keep_freed_cpu_memory": freed_memory_kept,
                "cpu": platform.processor() or platform.machine(),
                "raw_env_steps_per_s": round(raw),
                "vectorized_env_steps_per_s": round(vectorized_rate),
                "vectorized_seconds": round(vectorized.env_steps / vectorized_rate, 2),
                "vectorized_seconds_by_part": rounded(vectorized.seconds),
                "loop_env_steps_per_s": round(loop_rate) if loop_rate else None,
                "loop_seconds_by_part": rounded(loop_seconds),
                "vectorized_over_loop": round(vectorized_rate / loop_rate, 2) if loop_rate else None,
                "vectorized_over_raw": round(vectorized_rate / raw, 3),
                "targets": {"vectorized_over_loop": 10, "vectorized_over_raw": 0.15},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
