"""The metagrad stage: IMPALA with meta-gradients on gamma/lambda, over a game x variant x seed grid."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .common import (
    Device,
    Frozen,
    MetagradVariant,
    PositiveFloat,
    PositiveInt,
    Probability,
    check_game,
)


class MetaConfig(Frozen):
    """Meta-gradient settings (Xu, van Hasselt & Silver 2018)."""

    objective: Literal["policy_gradient", "value_error"] = "policy_gradient"
    """Meta-objective: `policy_gradient` (the paper's) or `value_error`."""
    lr: PositiveFloat = 1e-3
    """beta: Adam learning rate on the logits of eta = (gamma, lambda)."""
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Meta Adam beta1."""
    adam_beta2: Probability = 0.999
    """Meta Adam beta2."""
    gamma_bar: Probability = 0.99
    """Fixed discount of the meta-objective."""
    lambda_bar: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Fixed lambda of the meta-objective."""
    init_gamma: Probability = 0.99
    """Initial value of a meta-learned gamma."""
    init_lambda: Probability = 0.99
    """Initial value of a meta-learned lambda."""
    grad_mode: Literal["jvp", "naive"] = "jvp"
    """`jvp` (forward-mode meta-gradient) or `naive` (the slower test oracle)."""
    embedding_dim: PositiveInt = 16
    """Size of the eta embedding the agent is conditioned on."""


class AtariEnvConfig(Frozen):
    frameskip: PositiveInt = 4
    """Frames per agent step (max-pooled over the last two)."""
    stack: PositiveInt = 4
    """Frames stacked into one observation."""
    noop_max: Annotated[int, Field(ge=0)] = 30
    """At most this many no-op actions at the start of an episode."""
    max_episode_frames: PositiveInt = 108_000
    """Episodes are truncated after this many frames."""
    env_threads: Annotated[int, Field(ge=0)] = 0
    """ALE threads of the vector env; 0: one per core."""


class MetagradRayConfig(Frozen):
    """Where the cells of the metagrad grid run (``pipeline/metagrad/grid.py``).

    ``concurrent_cells: 1`` with no ``RAY_ADDRESS`` in the environment: cells train one after another
    in the stage's own process, without Ray. More cells at once, or ``RAY_ADDRESS`` set: every cell is
    a Ray task holding ``cpus_per_cell`` CPUs (also its torch threads) and ``gpus_per_cell`` GPUs, on
    the cluster ``RAY_ADDRESS`` names or else on a local Ray started for the stage. A task whose worker
    dies is retried up to ``max_retries`` times and resumes from the cell's checkpoint.
    ``checkpoint_storage``: the folder of the cell checkpoints; on a multi-machine cluster it must be
    shared storage mounted at the same path on every node (NFS, a parallel file system); null keeps
    them in the stage's ``checkpoints/metagrad`` (one machine, or a cluster on one machine).
    """

    concurrent_cells: Annotated[int, Field(ge=1, le=4096)] = 1
    """Cells trained at once; 1 without `RAY_ADDRESS` runs them serially in the stage's process."""
    cpus_per_cell: Annotated[int, Field(ge=1, le=1024)] = 1
    """CPUs a cell's Ray task holds (also its torch threads)."""
    gpus_per_cell: Annotated[float, Field(ge=0, le=64)] = 0
    """GPUs a cell's Ray task holds (fractions share a GPU)."""
    max_retries: Annotated[int, Field(ge=0, le=100)] = 3
    """Retries of a cell whose worker dies; each resumes from the cell's checkpoint."""
    checkpoint_storage: str | None = None
    """Folder of the cell checkpoints: shared storage on a multi-machine cluster; null keeps them in
    `checkpoints/metagrad`."""


Seed = Annotated[int, Field(ge=0, lt=2**31)]


class MetagradConfig(Frozen):
    """The metagrad grid: every (game, variant, seed) cell trains for ``frames`` frames.

    Seed rule: the cell (game, variant, s) trains with ``variant_seed(s, game)``, the seed the stage
    derived from a top-level ``seed: s`` before it had seeds; so ``seeds: [s]`` reproduces the
    single-seed results of ``seed: s`` exactly, and every variant of one (game, seed) shares the seed.
    A params file without ``metagrad.seeds`` trains the one seed ``[seed]`` (the top-level one).
    """

    games: list[str] = Field(min_length=1)
    """Games to train on (listed in `prepare.games`)."""
    variants: list[MetagradVariant] = Field(min_length=1)
    """Which of (gamma, lambda) are meta-learned: `impala` (the {} baseline, required), `lambda`,
    `gamma`, `gamma_lambda`."""
    seeds: list[Seed] = Field(default=[0], min_length=1)
    """One cell per (game, variant, seed); cell seed s trains exactly as `seed: s` did before the grid."""
    ray: MetagradRayConfig = MetagradRayConfig()
    """How cells are scheduled: serially in the stage's process, or as Ray tasks."""
    frames: PositiveInt = 200_000
    """Frames per cell (game, variant, seed), counting skipped frames (4 per agent step)."""
    num_envs: PositiveInt = 32
    """Parallel environments (batch size of an update)."""
    unroll: PositiveInt = 20
    """Steps per unroll (trajectory length of an update)."""
    network: Literal["nature", "impala_resnet"] = "nature"
    """`nature` (DQN CNN) or `impala_resnet`."""
    device: Device = "auto"
    """`cpu`, `cuda`, or `auto` (a CUDA GPU when torch sees one)."""
    lr: PositiveFloat = 6e-4
    """RMSProp learning rate."""
    lr_decay: bool = True
    """Decay the learning rate linearly from `lr` to `lr_final` over `frames`."""
    lr_final: Annotated[float, Field(ge=0)] = 0.0
    """Learning rate the linear decay ends at (`lr_decay: true`): a floor, at most `lr`; 0 decays to 0."""
    rmsprop_alpha: Probability = 0.99
    """RMSProp smoothing constant."""
    rmsprop_eps: PositiveFloat = 0.01
    """RMSProp epsilon."""
    entropy_cost: Annotated[float, Field(ge=0)] = 0.01
    """Weight of the entropy bonus."""
    baseline_cost: Annotated[float, Field(ge=0)] = 0.5
    """Weight of the value (baseline) loss."""
    grad_clip: PositiveFloat = 40.0
    """Global gradient-norm clip."""
    reward_clip: PositiveFloat = 1.0
    """Rewards are clipped to [-reward_clip, reward_clip]."""
    gamma: Probability = 0.99
    """Discount where gamma is not meta-learned."""
    lambda_: Annotated[float, Field(gt=0, le=1, alias="lambda")] = 1.0
    """V-trace lambda where lambda is not meta-learned (key `lambda`)."""
    clip_rho: PositiveFloat = 1.0
    """V-trace rho-bar: clip of the importance weights in the value targets."""
    clip_c: PositiveFloat = 1.0
    """V-trace c-bar: clip of the trace-cutting coefficients."""
    checkpoint_every: PositiveInt = 50
    """Updates between checkpoints."""
    log_every: PositiveInt = 10
    """Updates between logged metrics."""
    env: AtariEnvConfig = AtariEnvConfig()
    """Atari preprocessing."""
    meta: MetaConfig = MetaConfig()
    """Meta-gradient settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("games")
    @classmethod
    def _known_games(cls, games: list[str]) -> list[str]:
        for game in games:
            check_game(game)
        return games

    @field_validator("variants")
    @classmethod
    def _baseline_present(cls, variants: list[str]) -> list[str]:
        if "impala" not in variants:
            raise ValueError(
                "variants must include 'impala' (the {} baseline every variant is compared with)"
            )
        if len(set(variants)) != len(variants):
            raise ValueError("variants are listed more than once")
        return variants

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds are listed more than once")
        return seeds

    @model_validator(mode="after")
    def _lr_floor_below_lr(self) -> MetagradConfig:
        if self.lr_final > self.lr:
            raise ValueError(
                f"lr_final ({self.lr_final:g}) must be at most lr ({self.lr:g}): it is the decay's end"
            )
        if self.lr_final > 0 and not self.lr_decay:
            raise ValueError(
                f"lr_final ({self.lr_final:g}) is the end of the lr decay, but lr_decay is false "
                "(a constant lr): set lr_decay: true or drop lr_final"
            )
        return self
