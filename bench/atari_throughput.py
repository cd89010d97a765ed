"""Atari learner throughput, measured in one run with the same envs, threads and network (prints JSON).

    python bench/atari_throughput.py [--game pong] [--updates 12] [--network nature]

(a) raw vector-env frames/s with random actions; (b) acting-only frames/s (policy forward on batches of
env observations); (c) learner-only frames/s (updates on stored rollouts, the {} baseline); then the
end-to-end frames/s of the {} learner and of the {gamma, lambda} learner. The serial limit is
1 / (1/a + 1/b + 1/c): the speed of doing the three in turn with nothing wasted. Targets: {} end to end
>= 0.8 of that limit; {gamma, lambda} >= 0.6 of {} end to end.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.devices import resolve_device
from pipeline.envs.atari import AtariStepper
from pipeline.metagrad.learner import MetaGradientLearner
from pipeline.metagrad.train import Actor, limit_cpu_threads_for


def timed(function, repeats: int, device: torch.device) -> float:
    """Seconds per call; on a GPU the queued kernels are waited for (they run asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    function()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--game", default=None, help="default: the first of metagrad.games")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--network", default=None, choices=["nature", "impala_resnet"])
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="default: as the metagrad stage (1 on a GPU, else torch's choice)",
    )
    args = parser.parse_args()

    config = load_params(args.params).metagrad
    if args.network:
        config = config.model_copy(update={"network": args.network})
    game = args.game or config.games[0]
    device = resolve_device(config.device, "metagrad.device")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    else:
        limit_cpu_threads_for(device)  # what the metagrad stage does
    frames_per_update = config.num_envs * config.unroll * config.env.frameskip
    torch.manual_seed(0)

    stepper = AtariStepper(game, config.num_envs, config.env, seed=0)
    stepper.reset()
    rng = np.random.default_rng(0)
    steps = config.unroll * args.updates
    start = time.perf_counter()
    for _ in range(steps):
        stepper.step(rng.integers(stepper.num_actions, size=config.num_envs))
    raw = steps * config.num_envs * config.env.frameskip / (time.perf_counter() - start)

    def learner(variant: str) -> MetaGradientLearner:
        return MetaGradientLearner(config, variant, stepper.num_actions, 10_000, device)

    baseline = learner("impala")
    actor = Actor(stepper, config.unroll, device)
    rollouts = [actor.collect(baseline)[0] for _ in range(2)]
    observations = rollouts[0].obs[0].to(device)
    acting = config.num_envs * config.env.frameskip / timed(lambda: baseline.act(observations), 50, device)
    learning = frames_per_update / timed(lambda: baseline.update(rollouts[0]), args.updates, device)
    serial_limit = 1.0 / (1.0 / raw + 1.0 / acting + 1.0 / learning)

    def end_to_end(variant: str) -> float:
        agent = learner(variant)
        agent.update(actor.collect(agent)[0])  # warm-up (and the first meta step's pending state)
        start = time.perf_counter()
        for _ in range(args.updates):
            agent.update(actor.collect(agent)[0])
        return args.updates * frames_per_update / (time.perf_counter() - start)

    baseline_e2e = end_to_end("impala")
    meta_e2e = end_to_end("gamma_lambda")
    stepper.close()
    print(
        json.dumps(
            {
                "game": game,
                "network": config.network,
                "device": str(device),
                "num_envs": config.num_envs,
                "unroll": config.unroll,
                "torch_threads": torch.get_num_threads(),
                "meta_grad_mode": config.meta.grad_mode,
                "a_raw_env_frames_per_s": round(raw),
                "b_acting_frames_per_s": round(acting),
                "c_learner_frames_per_s": round(learning),
                "serial_limit_frames_per_s": round(serial_limit),
                "impala_end_to_end_frames_per_s": round(baseline_e2e),
                "gamma_lambda_end_to_end_frames_per_s": round(meta_e2e),
                "impala_over_serial_limit": round(baseline_e2e / serial_limit, 3),
                "gamma_lambda_over_impala": round(meta_e2e / baseline_e2e, 3),
                "targets": {"impala_over_serial_limit": 0.8, "gamma_lambda_over_impala": 0.6},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
