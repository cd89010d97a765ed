"""MAML for RL (Finn, Abbeel & Levine 2017): inner policy-gradient steps and the meta-objective.

Everything is a pure function of parameter dicts. The meta-parameters ``theta0`` have leaves with a
leading dimension of 1 (one policy); the policies adapted to the T tasks of a meta-batch are stacked
``[T, ...]`` leaves (:mod:`pipeline.rl.policy`), so a whole meta-batch is one batched computation.

Inner step, per task t (vanilla policy gradient on the task's episodes D_t)::

    L_t(theta)  = - sum_{h,n} m_hn log pi_theta(a_hn | s_hn) A_hn / sum_{h,n} m_hn
    theta'_t    = theta_t - alpha * grad L_t(theta_t)

computed with ``torch.func.grad`` of ``sum_t L_t`` over the stacked leaves: task t's loss depends on
slice t only, so slice t of that gradient is task t's own gradient. The result stays differentiable
in ``theta0`` (second order: the meta-gradient flows through ``grad L_t``); ``first_order=True``
detaches the inner gradient (FOMAML, ``d theta' / d theta0 = I``).

Meta-objective on the post-adaptation episodes D'_t sampled by ``theta'_t`` (the TRPO surrogate)::

    S(theta0)  = mean_t  sum m * exp(log pi_{theta'_t(theta0)}(a|s) - log pi_old(a|s)) * A' / sum m
    KL(theta0) = mean_t  sum m * KL(pi_old(.|s) || pi_{theta'_t(theta0)}(.|s)) / sum m

where ``pi_old`` is the adapted policy that sampled D'. As in the paper, the dependence of the inner
episodes' distribution on theta0 is not differentiated (the data are constants).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad

from ..rl import policy as pol
from .sampling import Episodes, task_rows


class MetaBatch(NamedTuple):
    """The data of one meta-iteration: K inner-step episode sets, then the post-adaptation episodes."""

    train: tuple[Episodes, ...]  # K sets, the k-th sampled by the policies after k inner steps
    valid: Episodes  # sampled by the policies after K inner steps
    old_head: Tensor  # [T, H*N, out] policy_head of those sampling policies on valid.obs (no grad)

    @property
    def tasks(self) -> int:
        return self.valid.tasks


def expand_tasks(theta0: dict, tasks: int) -> dict:
    """One policy ([1, ...] leaves) -> T identical stacked copies (a view; gradients sum over tasks)."""
    return {name: value.expand(tasks, *value.shape[1:]) for name, value in theta0.items()}


def masked_task_mean(values: Tensor, mask_rows: Tensor) -> Tensor:
    """``[T, rows]`` -> ``[T]``: the mean over each task's valid rows."""
    return (values * mask_rows).sum(1) / mask_rows.sum(1).clamp_min(1.0)


def inner_losses(spec: pol.PolicySpec, params: dict, episodes: Episodes) -> Tensor:
    """``[T]`` vanilla policy-gradient losses ``L_t`` of the stacked policies on their episodes."""
    head = pol.policy_head(spec, params, task_rows(episodes.obs))
    log_prob = pol.log_prob(spec, head, task_rows(episodes.actions))
    return -masked_task_mean(log_prob * task_rows(episodes.advantages), task_rows(episodes.mask))


def inner_step(spec: pol.PolicySpec, params: dict, episodes: Episodes, lr: float, first_order: bool) -> dict:
    """One inner step ``theta' = theta - lr * grad L_t(theta)`` of every task's stacked policy."""
    if next(iter(params.values())).shape[0] != episodes.tasks:
        raise ValueError(
            f"params stack {next(iter(params.values())).shape[0]} policies for {episodes.tasks} tasks"
        )
    grads = grad(lambda p: inner_losses(spec, p, episodes).sum())(params)
    if first_order:
        grads = {name: g.detach() for name, g in grads.items()}
    return {name: params[name] - lr * grads[name] for name in params}


def adapt(
    spec: pol.PolicySpec, theta0: dict, train: Sequence[Episodes], lr: float, first_order: bool
) -> dict:
    """theta0 adapted by one inner step per episode set of ``train``: stacked ``[T, ...]`` policies."""
    params = expand_tasks(theta0, train[0].tasks)
    for episodes in train:
        params = inner_step(spec, params, episodes, lr, first_order)
    return params


def kl_divergence(spec: pol.PolicySpec, old_head: Tensor, new_head: Tensor) -> Tensor:
    """``KL(old || new)`` per row from :func:`pol.policy_head` outputs ``[..., out]`` -> ``[...]``.

    Categorical: ``sum_a p_old (log p_old - log p_new)``; diagonal Gaussian:
    ``sum_d log s_new - log s_old + (s_old^2 + (m_old - m_new)^2) / (2 s_new^2) - 1/2``.
    """
    if spec.discrete:
        old_log, new_log = torch.log(old_head.clamp_min(1e-8)), torch.log(new_head.clamp_min(1e-8))
        return (old_head * (old_log - new_log)).sum(-1)
    old_mean, old_log_std = old_head.split(spec.action_dim, dim=-1)
    new_mean, new_log_std = new_head.split(spec.action_dim, dim=-1)
    ratio = (torch.exp(2 * old_log_std) + (old_mean - new_mean).square()) / (2 * torch.exp(2 * new_log_std))
    return (new_log_std - old_log_std + ratio - 0.5).sum(-1)


def meta_objective(
    spec: pol.PolicySpec, theta0: dict, batch: MetaBatch, lr: float, first_order: bool
) -> tuple[Tensor, Tensor]:
    """``(S_t, KL_t)``, each ``[T]``: the post-adaptation surrogate and KL of every task (see module).
    Without inner-step episodes (``batch.train`` empty) the policy is theta0 itself: the objective of
    the pretrained baseline, one policy trained on all tasks jointly."""
    if batch.train:
        params = adapt(spec, theta0, batch.train, lr, first_order)
    else:
        params = expand_tasks(theta0, batch.tasks)
    valid = batch.valid
    head = pol.policy_head(spec, params, task_rows(valid.obs))
    actions, mask = task_rows(valid.actions), task_rows(valid.mask)
    old_log_prob = pol.log_prob(spec, batch.old_head, actions)
    ratio = torch.exp(pol.log_prob(spec, head, actions) - old_log_prob)
    surrogate = masked_task_mean(ratio * task_rows(valid.advantages), mask)
    kl = masked_task_mean(kl_divergence(spec, batch.old_head, head), mask)
    return surrogate, kl
