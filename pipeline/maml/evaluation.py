"""Learning curves of a MAML policy file on held-out tasks: adaptation, then more of the same PG steps.

A *lifetime* is one (seed, task) pair, seed-major as in
:func:`pipeline.evaluation.epg_eval.evaluation_lifetimes`.
Every lifetime starts from the file's theta0 (MAML's meta-trained initialisation, or the pretrained
baseline's policy) and repeats: sample N = ``rollouts_per_task`` episodes with the current policy,
record their mean return, take one vanilla policy-gradient step on them (MAML's inner step: linear
feature baseline, ``inner_lr``). Steps 1..K (K = ``inner_steps``) are exactly MAML's adaptation; the
steps after K continue with the same update until the env-step budget is spent, so MAML can be set
against methods that learn from scratch at equal env steps.

All lifetimes run as one batched computation: one batched env of lifetimes x N copies, the lifetimes'
policies stacked ``[L, ...]`` (:func:`pipeline.maml.learner.adaptation_stream`, the very code that
adapts during meta-training); only the PG steps are a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MamlConfig
from ..evaluation.epg_eval import evaluation_lifetimes
from ..rl import policy as pol
from ..seeding import derived_seed
from .learner import adaptation_stream


@dataclass(frozen=True)
class AdaptationCurves:
    env_steps: list[int]  # cumulative env steps at each point; env_steps[0] == 0 (before any update)
    # [lifetimes, points] float: mean episode return of the rollouts sampled at that point
    returns: torch.Tensor
    inner_steps: int  # K: the number of MAML inner steps (points 1..K are the adaptation steps)


def policy_config(policy: dict) -> MamlConfig:
    """The MAML hyperparameters a policy file (``models/maml/policy.pt`` or ``pretrained.pt``) was
    trained with: family, policy architecture, rollouts_per_task, horizon, inner_lr, gamma, ..."""
    return MamlConfig.model_validate(policy["maml"])


def policy_spec_of(policy: dict) -> pol.PolicySpec:
    """The policy architecture of a policy file."""
    config = policy_config(policy)
    return pol.PolicySpec(
        int(policy["obs_dim"]),
        int(policy["action_dim"]),
        bool(policy["discrete"]),
        tuple(config.policy_hidden),
        config.init_log_std,
    )


def adaptation_curves(
    policy: dict,
    tasks: list[dict],
    seeds: int,
    env_step_budget: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> AdaptationCurves:
    """policy: the loaded content of models/maml/policy.pt (or models/maml/pretrained.pt); lifetimes are
    seed-major (seed s, then every task, like pipeline.evaluation.epg_eval.evaluation_lifetimes):
    lifetimes = seeds * len(tasks).

    Each lifetime: sample N = rollouts_per_task episodes with the current policy, record their mean
    return at the current env-step count, take a vanilla PG step (the MAML inner step: linear feature
    baseline, inner_lr) and repeat, until the next sampling would exceed env_step_budget. The first K
    steps are exactly MAML's adaptation (the same inner step as meta-training); the rest continue with
    the same PG step.

    What is counted: the env steps of the sampled episodes, i.e. each episode's own length (at most the
    policy file's ``horizon``; a cart-pole that falls after 20 steps counts 20). Every step an episode
    took counts, as every step of an EPG lifetime does; the steps a batched env copy idles after its
    episode ended belong to no episode and are not counted. Lifetimes take different numbers of steps;
    ``env_steps[i]`` is the largest count over lifetimes of the steps of the episodes sampled at points
    0..i-1: the data the policy of point i was trained on (0 at point 0: theta0 as loaded).

    When it stops: point i + 1 exists when the training data of its policy, the episodes of points
    0..i, took at most ``env_step_budget`` steps in every lifetime; so every PG step learns from
    episodes within the budget, and ``env_steps[-1] <= env_step_budget``. The episodes of the last
    point only measure its policy (no step learns from them) and may go past the budget, as MAML's
    post-adaptation episodes are evaluation data. Point 0 always exists: a budget smaller than the
    first N episodes gives theta0's return alone.

    Random numbers (action and reset noise) come from one CPU generator seeded with
    ``derived_seed(seed, "maml", "adaptation")``: the same lifetimes and seed give the same curves on
    every device, and two policy files evaluated with the same arguments meet the same noise.
    """
    if seeds < 1 or not tasks:
        raise ValueError(
            f"adaptation_curves needs seeds >= 1 and tasks, got seeds={seeds}, {len(tasks)} tasks"
        )
    config, spec = policy_config(policy), policy_spec_of(policy)
    theta0 = {name: value.to(device) for name, value in policy["theta"].items()}
    generator = torch.Generator().manual_seed(derived_seed(seed, "maml", "adaptation"))
    lifetimes = evaluation_lifetimes(tasks, seeds)
    stream = adaptation_stream(spec, config, theta0, config.family, lifetimes, generator, device)
    used = torch.zeros(len(lifetimes), dtype=torch.long)  # env steps of each lifetime's episodes so far
    env_steps, returns = [], []
    for episodes, _ in stream:  # the next PG step is only taken when the loop asks for the next point
        env_steps.append(int(used.max()))
        returns.append(episodes.task_returns().cpu())
        used = used + episodes.mask.sum((0, 2)).long().cpu()
        if int(used.max()) > env_step_budget:
            break
    return AdaptationCurves(env_steps, torch.stack(returns, dim=1).float(), config.inner_steps)
