"""The maml stage: MAML for RL (Finn et al. 2017)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .common import (
    Device,
    Frozen,
    PositiveFloat,
    PositiveInt,
    Probability,
    TaskFamily,
)


class MamlConfig(Frozen):
    """MAML for RL (Finn et al. 2017): a policy initialisation meta-trained by TRPO so that
    ``inner_steps`` vanilla policy-gradient steps (linear feature baseline) adapt it to a task."""

    family: TaskFamily = "point_goal"
    """Task family MAML meta-trains on (must be one of `prepare.task_families`)."""
    iterations: PositiveInt = 40
    """Meta-iterations (TRPO steps)."""
    meta_batch_size: PositiveInt = 20
    """Tasks per meta-iteration, drawn from the train split."""
    rollouts_per_task: PositiveInt = 10
    """Episodes per task per inner step (K in the paper: 20)."""
    horizon: PositiveInt = 50
    """Steps per episode at most (the family may end it sooner)."""
    inner_steps: PositiveInt = 1
    """Vanilla policy-gradient steps of the inner loop (adaptation)."""
    inner_lr: PositiveFloat = 0.1
    """Inner-loop learning rate alpha."""
    first_order: bool = False
    """True: FOMAML (the inner gradient is not differentiated); false: second order through the inner step."""
    gamma: Probability = 0.99
    """Discount of the returns in the inner and outer objectives."""
    normalize_advantages: bool = True
    """Standardise advantages per task, after the linear feature baseline."""
    max_kl: PositiveFloat = 0.01
    """TRPO trust region delta: mean KL between the old and new post-adaptation policies."""
    cg_iterations: PositiveInt = 10
    """Conjugate-gradient iterations on the KL Hessian-vector products."""
    cg_damping: Annotated[float, Field(ge=0)] = 1e-5
    """Damping added to the KL Hessian in conjugate gradient."""
    line_search_steps: PositiveInt = 15
    """Backtracking line-search steps at most."""
    line_search_backtrack: Probability = 0.5
    """Step shrink factor per line-search step."""
    policy_hidden: list[PositiveInt] = Field(default=[64, 64], min_length=1)
    """Hidden layer sizes of the tanh MLP policy."""
    init_log_std: float = 0.0
    """Initial log standard deviation of a Gaussian policy (continuous actions)."""
    eval_inner_steps: Annotated[int, Field(ge=0)] = 3
    """Test tasks are evaluated after 0..this many inner steps."""
    eval_tasks: PositiveInt = 16
    """Test tasks evaluated at the end (at most the test split's size)."""
    device: Device = "auto"
    """Where the meta-batch runs: `cpu`, `cuda`, or `auto`."""
    threads: Annotated[int, Field(ge=0)] = 1
    """Torch intra-op threads (0: torch's default, one per core). The meta-batch's matrices are small: on
    2 shared cores two threads spent 8x the CPU time of one (spinning OpenMP workers)."""
    checkpoint_every: PositiveInt = 5
    """Checkpoint every this many meta-iterations."""
