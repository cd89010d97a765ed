"""The evolve stage (EPG): loss network, inner loop and evolution strategies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .common import (
    Device,
    Fraction,
    Frozen,
    PositiveFloat,
    PositiveInt,
    Probability,
    TaskFamily,
)


class LossNetConfig(Frozen):
    """EPG loss network (Houthooft et al. 2018): temporal convolutions over the buffer + an MLP head."""

    memory_units: Annotated[int, Field(ge=0)] = 32
    """Memory units m = tanh(W 1 + b): extra per-lifetime parameters only the loss sees (0: none)."""
    conv_channels: list[PositiveInt] = Field(default=[16, 32], min_length=1)
    """Channels of the temporal convolutions over the buffer."""
    conv_kernels: list[PositiveInt] = Field(default=[6, 4], min_length=1)
    """Kernel sizes of the temporal convolutions (one per layer)."""
    conv_strides: list[PositiveInt] = Field(default=[5, 2], min_length=1)
    """Strides of the temporal convolutions (one per layer)."""
    hidden: PositiveInt = 16
    """Width of the loss network's MLP head."""
    context_gradient: bool = True
    """True (the official code): the context is recomputed for every minibatch and the loss also
    differentiates through the policy outputs at all N buffer steps. False: the context is
    computed once per update without gradient and only the minibatch steps are differentiated
    (cheaper)."""

    @model_validator(mode="after")
    def _same_lengths(self):
        if not len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides):
            raise ValueError("conv_channels, conv_kernels and conv_strides must have the same length")
        return self

    def conv_output_length(self, steps: int) -> int:
        for kernel, stride in zip(self.conv_kernels, self.conv_strides, strict=True):
            steps = (steps - kernel) // stride + 1
        return steps


class PPOConfig(Frozen):
    """PPO/PG settings shared by the annealed PPO term of EPG and the PPO/PG baselines."""

    clip: PositiveFloat = 0.2
    """PPO clip range epsilon: the ratio is clipped to [1 - clip, 1 + clip]."""
    gamma: Probability = 0.99
    """Discount of the returns and GAE."""
    gae_lambda: Fraction = 0.95
    """GAE lambda of PPO's advantages (REINFORCE uses 1, the Monte-Carlo return)."""
    value_coef: Annotated[float, Field(ge=0)] = 0.5
    """Weight of the value regression 0.5 (v - G)^2."""
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the entropy bonus."""


class InnerLoopConfig(Frozen):
    """One EPG lifetime (Algorithm 1): a fresh policy trained for ``lifetime_steps`` env steps."""

    lifetime_steps: PositiveInt = 2048
    """U: env steps of one lifetime (a fresh policy trained from scratch); a multiple of
    `update_every`."""
    update_every: PositiveInt = 64
    """M: env steps between updates; each update trains on these M steps."""
    buffer_size: PositiveInt = 256
    """N: steps of the buffer the evolved loss sees (its temporal context); at least `update_every`."""
    minibatch_size: PositiveInt = 32
    """Steps per minibatch Adam step; divides `update_every`."""
    epochs: PositiveInt = 1
    """Passes over the M steps per update."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate of the policy (and value, memory) parameters."""
    policy_hidden: list[PositiveInt] = Field(default=[64, 64], min_length=1)
    """Hidden layer widths of the policy (and value) MLPs."""
    init_log_std: float = -0.5
    """Initial log standard deviation of the Gaussian policy (continuous actions)."""
    fitness: Literal["final_episodes", "lifetime"] = "final_episodes"
    """`final_episodes`: mean return of fresh episodes after training (the paper); `lifetime`: mean
    return of the episodes finished during the lifetime."""
    fitness_episodes: PositiveInt = 3
    """Episodes played after training for `final_episodes` fitness."""
    ppo: PPOConfig = PPOConfig()
    """PPO/PG settings shared by the annealed PPO term of EPG and the PPO/PG baselines."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.lifetime_steps % self.update_every:
            raise ValueError(
                f"lifetime_steps ({self.lifetime_steps}) must be a multiple of "
                f"update_every ({self.update_every})"
            )
        if self.update_every % self.minibatch_size:
            raise ValueError(
                f"update_every ({self.update_every}) must be a multiple of "
                f"minibatch_size ({self.minibatch_size})"
            )
        if self.buffer_size < self.update_every:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must be >= update_every ({self.update_every})"
            )
        return self


class EvolveConfig(Frozen):
    family: TaskFamily = "point_goal"
    """Task family the loss is evolved on (listed in `prepare.task_families`)."""
    generations: PositiveInt = 40
    """ES generations (the paper's epochs E)."""
    popsize: Annotated[int, Field(ge=2)] = 16
    """V: perturbed losses per generation; even when `antithetic`."""
    antithetic: bool = True
    """Mirrored sampling: perturbations come in +eps / -eps pairs."""
    workers: PositiveInt = 8
    """W: lifetimes (tasks) per population member; the member's fitness is their mean."""
    sigma: PositiveFloat = 0.01
    """Fixed standard deviation of the ES perturbations."""
    lr_start: PositiveFloat = 1e-2
    """ES Adam learning rate at generation 0."""
    lr_end: PositiveFloat = 1e-3
    """ES Adam learning rate after `lr_decay_fraction` of the generations (linear in between)."""
    lr_decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Fraction of the generations over which the learning rate falls from `lr_start` to `lr_end`."""
    l2: Annotated[float, Field(ge=0)] = 1e-3
    """L2 decay on phi added to the ES gradient."""
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """ES Adam beta1 (0 in the paper)."""
    adam_beta2: Probability = 0.999
    """ES Adam beta2."""
    ppo_anneal_fraction: Fraction = 0.125
    """alpha of (1 - alpha) L_phi + alpha L_PPO falls from 1 to 0 over this fraction of the
    generations; 0 = pure evolved loss."""
    num_actors: Annotated[int, Field(ge=0)] = 0
    """Ray actors for fitness evaluation when > 1 (RAY_ADDRESS picks a cluster); 0 or 1: in process."""
    device: Device = "auto"
    """Where the lifetimes run: `cpu`, `cuda`, or `auto` (a CUDA GPU when torch sees one)."""
    checkpoint_every: PositiveInt = 5
    """Generations between checkpoints of the whole ES state."""
    inner: InnerLoopConfig = InnerLoopConfig()
    """The inner loop: one EPG lifetime."""
    loss_net: LossNetConfig = LossNetConfig()
    """The evolved loss network's architecture."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.antithetic and self.popsize % 2:
            raise ValueError(f"popsize ({self.popsize}) must be even when antithetic sampling is on")
        if self.loss_net.conv_output_length(self.inner.buffer_size) < 1:
            raise ValueError(
                f"inner.buffer_size ({self.inner.buffer_size}) is too short for the loss network's "
                "convolutions (conv_kernels/conv_strides)"
            )
        return self
