"""Tiny EPG settings shared by the CPU tests (test_epg.py) and the GPU tests (test_cuda.py).

No EvoTorch import here: the GPU machine's image has no Ray, which EvoTorch imports.
"""

from __future__ import annotations

import torch

from pipeline.config import EvolveConfig, InnerLoopConfig, LossNetConfig
from pipeline.envs.tasks import make_env, sample_tasks
from pipeline.epg.inner import loss_net_input_dim, policy_spec
from pipeline.epg.loss_net import initial_phi

TINY_INNER = InnerLoopConfig(
    lifetime_steps=96, update_every=32, buffer_size=64, minibatch_size=16, fitness_episodes=2
)
TINY_NET = LossNetConfig(memory_units=4)


def tiny_phi(family: str, members: int, scale: float = 0.05, seed: int = 0) -> torch.Tensor:
    tasks = sample_tasks(family, "train", 1, 0)
    env = make_env(family, tasks)
    dim = loss_net_input_dim(env, policy_spec(env, TINY_INNER), TINY_NET.memory_units)
    base = initial_phi(dim, TINY_NET, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    return base + scale * torch.randn(members, base.numel(), generator=generator)


def evolve_config(**overrides) -> EvolveConfig:
    base = dict(
        family="point_goal",
        generations=4,
        popsize=4,
        workers=2,
        sigma=0.05,
        checkpoint_every=2,
        inner=TINY_INNER.model_dump(),
        loss_net=TINY_NET.model_dump(),
    )
    return EvolveConfig(**{**base, **overrides})


def with_tiny_evolve(params: dict, **overrides) -> dict:
    """``params`` (a loaded params.yaml) with the tiny evolve section of ``evolve_config(**overrides)``, and
    MAML on the same task family: the evaluate stage compares the two on one family (the config says so)."""
    params["evolve"].update(evolve_config(**overrides).model_dump(mode="json"), num_actors=0)
    params["maml"]["family"] = params["evolve"]["family"]
    return params
