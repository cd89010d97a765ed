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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TaskFamily = Literal["point_goal", "random_cartpole", "random_hopper"]
SPLITS = ("test", "ood")
METAGRAD_VARIANTS = {
    # variant name -> which of (gamma, lambda) are meta-learned; "impala" is the {} baseline
    "impala": (),
    "lambda": ("lambda",),
    "gamma": ("gamma",),
    "gamma_lambda": ("gamma", "lambda"),
}
EPG_METHODS = ("evolved", "ppo", "pg", "random_loss")

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
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    task_families: list[TaskFamily] = Field(min_length=1)
    num_train_tasks: PositiveInt = 64
    num_test_tasks: PositiveInt = 16
    num_ood_tasks: PositiveInt = 16

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
    conv_channels: list[PositiveInt] = Field(default=[16, 32], min_length=1)
    conv_kernels: list[PositiveInt] = Field(default=[6, 4], min_length=1)
    conv_strides: list[PositiveInt] = Field(default=[5, 2], min_length=1)
    hidden: PositiveInt = 16
    # True (the official code): the context is recomputed for every minibatch and the loss also
    # differentiates through the policy outputs at all N buffer steps. False: the context is an input,
    # computed once per update without gradient; only the minibatch steps are differentiated (cheaper).
    context_gradient: bool = True

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
    gamma: Probability = 0.99
    gae_lambda: Fraction = 0.95
    value_coef: Annotated[float, Field(ge=0)] = 0.5
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0


class InnerLoopConfig(Frozen):
    """One EPG lifetime (Algorithm 1): a fresh policy trained for ``lifetime_steps`` env steps."""

    lifetime_steps: PositiveInt = 2048  # U
    update_every: PositiveInt = 64  # M
    buffer_size: PositiveInt = 256  # N
    minibatch_size: PositiveInt = 32
    epochs: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    policy_hidden: list[PositiveInt] = Field(default=[64, 64], min_length=1)
    init_log_std: float = -0.5
    fitness: Literal["final_episodes", "lifetime"] = "final_episodes"
    fitness_episodes: PositiveInt = 3
    ppo: PPOConfig = PPOConfig()

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
    generations: PositiveInt = 40
    popsize: Annotated[int, Field(ge=2)] = 16  # V, perturbed losses per generation
    antithetic: bool = True
    workers: PositiveInt = 8  # W lifetimes (tasks) per population member
    sigma: PositiveFloat = 0.01
    lr_start: PositiveFloat = 1e-2
    lr_end: PositiveFloat = 1e-3
    lr_decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    l2: Annotated[float, Field(ge=0)] = 1e-3
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.0
    adam_beta2: Probability = 0.999
    ppo_anneal_fraction: Fraction = 0.125
    num_actors: Annotated[int, Field(ge=0)] = 0
    device: Device = "auto"  # where the lifetimes run; "auto" takes a CUDA GPU when torch sees one
    checkpoint_every: PositiveInt = 5
    inner: InnerLoopConfig = InnerLoopConfig()
    loss_net: LossNetConfig = LossNetConfig()

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
    lr: PositiveFloat = 1e-3  # beta, Adam on the logits of eta
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Probability = 0.999
    gamma_bar: Probability = 0.99  # fixed discount of the meta-objective
    lambda_bar: Annotated[float, Field(gt=0, le=1)] = 1.0
    init_gamma: Probability = 0.99
    init_lambda: Probability = 0.99
    grad_mode: Literal["jvp", "naive"] = "jvp"
    embedding_dim: PositiveInt = 16


class AtariEnvConfig(Frozen):
    frameskip: PositiveInt = 4
    stack: PositiveInt = 4
    noop_max: Annotated[int, Field(ge=0)] = 30
    max_episode_frames: PositiveInt = 108_000
    env_threads: Annotated[int, Field(ge=0)] = 0  # 0: one per core


class MetagradConfig(Frozen):
    games: list[str] = Field(min_length=1)
    variants: list[Literal["impala", "lambda", "gamma", "gamma_lambda"]] = Field(min_length=1)
    frames: PositiveInt = 200_000  # per variant and game, counting skipped frames (4 per agent step)
    num_envs: PositiveInt = 32
    unroll: PositiveInt = 20
    network: Literal["nature", "impala_resnet"] = "nature"
    device: Device = "auto"
    lr: PositiveFloat = 6e-4
    lr_decay: bool = True  # linearly to 0 over `frames`
    rmsprop_alpha: Probability = 0.99
    rmsprop_eps: PositiveFloat = 0.01
    entropy_cost: Annotated[float, Field(ge=0)] = 0.01
    baseline_cost: Annotated[float, Field(ge=0)] = 0.5
    grad_clip: PositiveFloat = 40.0
    reward_clip: PositiveFloat = 1.0
    gamma: Probability = 0.99  # used where gamma is not meta-learned
    lambda_: Annotated[float, Field(gt=0, le=1, alias="lambda")] = (
        1.0  # used where lambda is not meta-learned
    )
    clip_rho: PositiveFloat = 1.0
    clip_c: PositiveFloat = 1.0
    checkpoint_every: PositiveInt = 50  # updates
    log_every: PositiveInt = 10  # updates
    env: AtariEnvConfig = AtariEnvConfig()
    meta: MetaConfig = MetaConfig()

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


# --------------------------------------------------------------------------------------------- maml
class MamlConfig(Frozen):
    """MAML for RL (Finn et al. 2017): a policy initialisation meta-trained by TRPO so that
    ``inner_steps`` vanilla policy-gradient steps (linear feature baseline) adapt it to a task."""

    family: TaskFamily = "point_goal"
    iterations: PositiveInt = 40  # meta-iterations (TRPO steps)
    meta_batch_size: PositiveInt = 20  # tasks per meta-iteration, drawn from the train split
    rollouts_per_task: PositiveInt = 10  # episodes per task per inner step (K in the paper: 20)
    horizon: PositiveInt = 50  # steps per episode at most (the family may end it sooner)
    inner_steps: PositiveInt = 1
    inner_lr: PositiveFloat = 0.1  # alpha
    first_order: bool = False  # true: FOMAML (the inner gradient is not differentiated)
    gamma: Probability = 0.99
    normalize_advantages: bool = True  # per task, after the linear feature baseline
    max_kl: PositiveFloat = 0.01  # TRPO trust region delta
    cg_iterations: PositiveInt = 10
    cg_damping: Annotated[float, Field(ge=0)] = 1e-5
    line_search_steps: PositiveInt = 15
    line_search_backtrack: Probability = 0.5
    policy_hidden: list[PositiveInt] = Field(default=[64, 64], min_length=1)
    init_log_std: float = 0.0
    eval_inner_steps: Annotated[int, Field(ge=0)] = 3  # test tasks are evaluated after 0..this many steps
    eval_tasks: PositiveInt = 16  # test tasks evaluated at the end (at most the test split's size)
    device: Device = "auto"
    # torch intra-op threads (0: torch's default, one per core). The meta-batch's matrices are small:
    # on 2 shared cores, two threads spent 8x the CPU time of one (spinning OpenMP workers).
    threads: Annotated[int, Field(ge=0)] = 1
    checkpoint_every: PositiveInt = 5


# --------------------------------------------------------------------------------------------- evaluate
class EpgEvalConfig(Frozen):
    loss: str = "models/epg/loss.pt"  # a file, or a registry URI such as models:/epg-loss@champion
    seeds: PositiveInt = 5
    methods: list[Literal["evolved", "ppo", "pg", "random_loss"]] = Field(
        default=list(EPG_METHODS), min_length=1
    )
    splits: list[Literal["test", "ood"]] = Field(default=list(SPLITS), min_length=1)
    max_tasks_per_split: PositiveInt = 16
    curve_points: PositiveInt = 16
    confidence: Probability = 0.95
    device: Device = "auto"  # where the evaluation lifetimes run


class AtariEvalConfig(Frozen):
    episodes: PositiveInt = 30
    noop_max: PositiveInt = 30
    max_episode_frames: PositiveInt = 108_000


class PromotionConfig(Frozen):
    enabled: bool = True
    alias: str = "champion"


class EvaluateConfig(Frozen):
    epg: EpgEvalConfig = EpgEvalConfig()
    atari: AtariEvalConfig = AtariEvalConfig()
    promotion: PromotionConfig = PromotionConfig()


# --------------------------------------------------------------------------------------------- top level
class TrackingConfig(Frozen):
    experiment: str = Field(default="meta-rl", min_length=1)
    registered_model: str = Field(default="epg-loss", min_length=1)
    system_metrics: bool = True


class PipelineConfig(Frozen):
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    tracking: TrackingConfig = TrackingConfig()
    prepare: PrepareConfig
    evolve: EvolveConfig = EvolveConfig()
    metagrad: MetagradConfig
    maml: MamlConfig = MamlConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

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
    """Read and validate a params file; raise ConfigError with one line per bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{path}: expected a mapping of sections ({', '.join(PipelineConfig.model_fields)})"]
        )
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
