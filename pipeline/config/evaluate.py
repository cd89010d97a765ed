"""The evaluate stage: held-out EPG lifetimes, Atari scores, registry promotion."""

from __future__ import annotations

from pydantic import Field

from .common import (
    EPG_METHODS,
    HELD_OUT_SPLITS,
    Device,
    EpgMethod,
    Frozen,
    HeldOutSplit,
    PositiveInt,
    Probability,
)


class EpgEvalConfig(Frozen):
    loss: str = "models/epg/loss.pt"
    """The evolved loss: a file, or a registry URI such as `models:/epg-loss@champion`."""
    seeds: PositiveInt = 5
    """Seeds per task: each method trains one fresh policy per (task, seed) pair."""
    methods: list[EpgMethod] = Field(default=list(EPG_METHODS), min_length=1)
    """Methods compared on the same lifetimes: `evolved`, `ppo`, `pg` (REINFORCE + baseline),
    `random_loss` (a random loss network, the floor), `maml` (MAML's θ₀: its K inner steps, then the
    same policy-gradient steps to the end of the budget) and `pretrained` (one policy trained on all
    training tasks jointly, then fine-tuned the same way)."""
    maml_policy: str = "models/maml/policy.pt"
    """MAML's meta-trained policy (the maml stage's output), read when `methods` lists `maml`."""
    pretrained_policy: str = "models/maml/pretrained.pt"
    """The jointly pretrained policy (the maml stage's output), read when `methods` lists `pretrained`."""
    lifetime_steps: PositiveInt | None = None
    """Env steps of every evaluation lifetime, the one budget every method gets (the EPG methods train
    for it; MAML and the pretrained policy sample and adapt within it). `null`: the evolved loss's own
    lifetime (`evolve.inner.lifetime_steps`). Longer lifetimes test whether the evolved loss keeps
    training past the lifetime it was evolved for, and give MAML room for full-length episodes (its
    episodes take up to `maml.horizon` steps, `maml.rollouts_per_task` of them per sampling). A
    multiple of the loss's `update_every`."""
    splits: list[HeldOutSplit] = Field(default=list(HELD_OUT_SPLITS), min_length=1)
    """Held-out task splits to evaluate on: `test` (training distribution) and/or `ood`."""
    max_tasks_per_split: PositiveInt = 16
    """At most this many tasks of each split."""
    curve_points: PositiveInt = 16
    """Points kept of each learning curve."""
    confidence: Probability = 0.95
    """Level of the Student-t confidence intervals."""
    device: Device = "auto"
    """Where the evaluation lifetimes run: `cpu`, `cuda`, or `auto`."""


class AtariEvalConfig(Frozen):
    episodes: PositiveInt = 30
    """No-op-start episodes per trained agent."""
    noop_max: PositiveInt = 30
    """At most this many no-op actions at the start of an episode."""
    max_episode_frames: PositiveInt = 108_000
    """Episodes are truncated after this many frames."""


class PromotionConfig(Frozen):
    enabled: bool = True
    """Move the alias to the evaluated loss when its held-out return beats the holder's (or there is none)."""
    alias: str = "champion"
    """Registry alias of the best loss so far."""


class EvaluateConfig(Frozen):
    epg: EpgEvalConfig = EpgEvalConfig()
    """The evolved loss on held-out and out-of-distribution tasks."""
    atari: AtariEvalConfig = AtariEvalConfig()
    """Scores of the trained metagrad agents."""
    promotion: PromotionConfig = PromotionConfig()
    """Promotion of the evaluated loss in the Model Registry."""
