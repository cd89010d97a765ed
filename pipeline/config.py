"""Typed, frozen configuration for every stage, built from ``params.yaml``.

``params.yaml`` is validated as a whole before a stage does any work: unknown keys, wrong types and
out-of-range values are reported one line per bad key (dotted key path, bad value, what is
allowed), and the stage exits with status 2 without writing anything (see ``ConfigError``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Each concept is listed once, here; the config's Literals, the task code and the report's labels are
# built from these (pipeline.envs.tasks implements one class per task family).
TASK_FAMILIES = ("point_goal", "random_cartpole", "random_hopper")
TASK_SPLITS = ("train", "test", "ood")  # evolve trains on "train"; the others are held out
HELD_OUT_SPLITS = TASK_SPLITS[1:]
METAGRAD_VARIANTS = {
    # variant name -> which of (gamma, lambda) are meta-learned; "impala" is the {} baseline
    "impala": (),
    "lambda": ("lambda",),
    "gamma": ("gamma",),
    "gamma_lambda": ("gamma", "lambda"),
}
EPG_METHODS = {  # method -> its label in the report
    "evolved": "evolved loss (EPG)",
    "ppo": "PPO",
    "pg": "vanilla PG (REINFORCE + baseline)",
    "random_loss": "random loss network (floor)",
}

TaskFamily = Literal[TASK_FAMILIES]
HeldOutSplit = Literal[HELD_OUT_SPLITS]
MetagradVariant = Literal[tuple(METAGRAD_VARIANTS)]
EpgMethod = Literal[tuple(EPG_METHODS)]


def variant_label(variant: str) -> str:
    """``{γ, λ}`` etc.: the set of meta-learned parameters, as the paper writes it; IMPALA for ``{}``."""
    symbols = {"gamma": "γ", "lambda": "λ"}
    learned = ", ".join(symbols[name] for name in METAGRAD_VARIANTS[variant])
    return f"{{{learned}}}" if learned else "IMPALA {}"


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, lt=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Device = Literal["auto", "cpu", "cuda"]  # "auto": a CUDA GPU when torch sees one, else the CPU


class ConfigError(Exception):
    """Bad params: ``lines`` holds one human-readable message per bad key."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class Frozen(BaseModel):
    # Field docstrings become the fields' descriptions: docs/params.md is generated from them.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


# --------------------------------------------------------------------------------------------- prepare
@functools.lru_cache(maxsize=1)
def ale_games() -> tuple[str, ...]:
    from ale_py import roms

    return tuple(sorted(roms.get_all_rom_ids()))


def check_game(name: str) -> str:
    """Return ``name`` if ALE ships a ROM for it, else raise ValueError naming close matches."""
    games = ale_games()
    if name in games:
        return name
    close = difflib.get_close_matches(name, games, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "no close match"
    raise ValueError(
        f"unknown ALE game {name!r} ({hint}); games are snake_case ROM ids such as pong, breakout, "
        f"ms_pacman; list all {len(games)} with `python -m pipeline games`"
    )


class PrepareConfig(Frozen):
    games: list[str] = Field(min_length=1)
    """ALE games to check and describe: snake_case ROM ids (pong, ms_pacman, ...; `python -m pipeline
    games` lists them). Must include every metagrad game."""
    task_families: list[TaskFamily] = Field(min_length=1)
    """Task families whose train/test/ood tasks are drawn; must include `evolve.family`."""
    num_train_tasks: PositiveInt = 64
    """Size of the training pool the evolve stage samples each generation's tasks from."""
    num_test_tasks: PositiveInt = 16
    """Held-out tasks from the training distribution (evaluation split `test`)."""
    num_ood_tasks: PositiveInt = 16
    """Out-of-distribution tasks (evaluation split `ood`)."""

    @field_validator("games")
    @classmethod
    def _known_games(cls, games: list[str]) -> list[str]:
        for game in games:
            check_game(game)
        if len(set(games)) != len(games):
            raise ValueError("games are listed more than once")
        return games


# --------------------------------------------------------------------------------------------- evolve
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


# --------------------------------------------------------------------------------------------- metagrad
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
    """Decay the learning rate linearly to 0 over `frames`."""
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


# --------------------------------------------------------------------------------------------- maml
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


# --------------------------------------------------------------------------------------------- evaluate
class EpgEvalConfig(Frozen):
    loss: str = "models/epg/loss.pt"
    """The evolved loss: a file, or a registry URI such as `models:/epg-loss@champion`."""
    seeds: PositiveInt = 5
    """Seeds per task: each method trains one fresh policy per (task, seed) pair."""
    methods: list[EpgMethod] = Field(default=list(EPG_METHODS), min_length=1)
    """Methods compared on the same lifetimes: `evolved`, `ppo`, `pg` (REINFORCE + baseline),
    `random_loss` (a random loss network, the floor)."""
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


# --------------------------------------------------------------------------------------------- top level
class TrackingConfig(Frozen):
    experiment: str = Field(default="meta-rl", min_length=1)
    """MLflow experiment every stage logs to."""
    registered_model: str = Field(default="epg-loss", min_length=1)
    """MLflow Model Registry name of the evolved losses."""
    system_metrics: bool = True
    """Log CPU/memory metrics for the long stages."""


class PipelineConfig(Frozen):
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    """Root seed: every other seed is derived from it and names (`pipeline/seeding.py`)."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking."""
    prepare: PrepareConfig
    """The prepare stage: ROM checks, env metadata, task splits."""
    evolve: EvolveConfig = EvolveConfig()
    """The evolve stage: EPG, evolution strategies over the loss parameters phi."""
    metagrad: MetagradConfig
    """The metagrad stage: IMPALA with meta-gradients on gamma/lambda."""
    maml: MamlConfig = MamlConfig()
    """The maml stage: MAML (Finn et al. 2017), a policy initialisation meta-trained with TRPO."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """The evaluate stage."""

    @model_validator(mode="before")
    @classmethod
    def _default_metagrad_seeds(cls, data: Any) -> Any:
        """Without ``metagrad.seeds`` the grid trains the top-level seed (as before seeds existed)."""
        metagrad = data.get("metagrad") if isinstance(data, dict) else None
        if isinstance(metagrad, dict) and "seeds" not in metagrad:
            data = {**data, "metagrad": {**metagrad, "seeds": [data.get("seed", 0)]}}
        return data

    @model_validator(mode="after")
    def _cross_section(self):
        missing = [g for g in self.metagrad.games if g not in self.prepare.games]
        if missing:
            raise ValueError(f"metagrad.games {missing} must also be listed in prepare.games")
        if self.evolve.family not in self.prepare.task_families:
            raise ValueError(f"evolve.family {self.evolve.family!r} must be listed in prepare.task_families")
        return self

    @model_validator(mode="after")
    def _maml_family_prepared(self):
        if self.maml.family not in self.prepare.task_families:
            raise ValueError(f"maml.family {self.maml.family!r} must be listed in prepare.task_families")
        return self


STAGES = ("prepare", "evolve", "metagrad", "maml", "evaluate")


def load_params(path: str | Path = "params.yaml") -> PipelineConfig:
    """Read and validate a params file (a profile overlay is merged onto its base first, see
    ``pipeline.profiles``); raise ConfigError with one line per bad key."""
    from .profiles import read_params  # profiles builds on this module

    path = Path(path)
    raw = read_params(path)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, path)) from None


def format_validation_error(err: ValidationError, source: str | Path) -> list[str]:
    lines = []
    for item in err.errors():
        loc = [part for part in item["loc"] if not str(part).startswith(("function-", "literal["))]
        key = ".".join(str(part) for part in loc) or "<top level>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(f"{source}: {key}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        if item["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
            continue
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key} = {_short(item.get('input'))}: {message}")
    return lines


def _allowed_keys(loc: list[Any]) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return [field.alias or name for name, field in model.model_fields.items()]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def section_dict(config: PipelineConfig, stage: str) -> dict:
    """The params a stage depends on (its own section plus the global seed), as plain data."""
    return {"seed": config.seed, stage: getattr(config, stage).model_dump(mode="json", by_alias=True)}


def params_hash(section: dict) -> str:
    canonical = json.dumps(section, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values), for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
