"""Typed, frozen configuration for every stage, built from ``params.yaml``.

``params.yaml`` is validated as a whole before a stage does any work: unknown keys, wrong types and
out-of-range values are reported one line per bad key (dotted key path, bad value, what is
allowed), and the stage exits with status 2 without writing anything (see ``ConfigError``).

The models live beside their stage (``common``, ``evolve``, ``metagrad``, ``maml``, ``evaluate``); this
module assembles ``PipelineConfig``, loads and validates params files and re-exports every name, so
``from pipeline.config import MetagradConfig`` is the one import users need.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from .common import (
    EPG_METHODS,
    HELD_OUT_SPLITS,
    METAGRAD_VARIANTS,
    TASK_FAMILIES,
    TASK_SPLITS,
    ConfigError,
    Device,
    EpgMethod,
    Fraction,
    Frozen,
    HeldOutSplit,
    MetagradVariant,
    PositiveFloat,
    PositiveInt,
    PrepareConfig,
    Probability,
    TaskFamily,
    ale_games,
    check_game,
    variant_label,
)
from .evaluate import (
    AtariEvalConfig,
    EpgEvalConfig,
    EvaluateConfig,
    PromotionConfig,
)
from .evolve import (
    EvolveConfig,
    InnerLoopConfig,
    LossNetConfig,
    PPOConfig,
)
from .maml import (
    MamlConfig,
)
from .metagrad import (
    AtariEnvConfig,
    MetaConfig,
    MetagradConfig,
    MetagradRayConfig,
    Seed,
)


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
        check_maml_compared_on_epg_family(self.maml.family, self.evolve.family, self.evaluate.epg.methods)
        evaluation_lifetime(self.evaluate.epg.lifetime_steps, self.evolve.inner)
        return self


MAML_COMPARISON_METHODS = ("maml", "pretrained")
"""evaluate.epg.methods that run the maml stage's policy files on the EPG lifetimes' tasks."""


def evaluation_lifetime(lifetime_steps: int | None, inner: InnerLoopConfig) -> int:
    """The env steps of every evaluation lifetime: ``evaluate.epg.lifetime_steps``, or the evolved
    loss's own lifetime when it is null; it must be a multiple of the loss's ``update_every``."""
    if lifetime_steps is None:
        return inner.lifetime_steps
    if lifetime_steps % inner.update_every:
        raise ValueError(
            f"evaluate.epg.lifetime_steps ({lifetime_steps}) must be a multiple of the evolved "
            f"loss's update_every ({inner.update_every}), or null for its own lifetime "
            f"({inner.lifetime_steps})"
        )
    return lifetime_steps


def check_maml_compared_on_epg_family(maml_family: str, evolve_family: str, methods) -> None:
    """When evaluate sets MAML against EPG, both must have trained on one task family: MAML's policy
    acts on evolve.family's tasks (its observation and action spaces)."""
    compared = [method for method in methods if method in MAML_COMPARISON_METHODS]
    if compared and maml_family != evolve_family:
        raise ValueError(
            f"maml.family {maml_family!r} must equal evolve.family {evolve_family!r}: "
            f"evaluate.epg.methods {compared} compares MAML with EPG on evolve.family's tasks"
        )


__all__ = [
    "ale_games",
    "check_game",
    "ConfigError",
    "Device",
    "EPG_METHODS",
    "EpgMethod",
    "Fraction",
    "Frozen",
    "HELD_OUT_SPLITS",
    "HeldOutSplit",
    "METAGRAD_VARIANTS",
    "MetagradVariant",
    "PositiveFloat",
    "PositiveInt",
    "PrepareConfig",
    "Probability",
    "TASK_FAMILIES",
    "TASK_SPLITS",
    "TaskFamily",
    "variant_label",
    "EvolveConfig",
    "InnerLoopConfig",
    "LossNetConfig",
    "PPOConfig",
    "AtariEnvConfig",
    "MetaConfig",
    "MetagradConfig",
    "MetagradRayConfig",
    "Seed",
    "MamlConfig",
    "AtariEvalConfig",
    "EpgEvalConfig",
    "EvaluateConfig",
    "PromotionConfig",
    "PipelineConfig",
    "TrackingConfig",
    "STAGES",
    "MAML_COMPARISON_METHODS",
    "check_maml_compared_on_epg_family",
    "evaluation_lifetime",
    "load_params",
    "format_validation_error",
    "section_dict",
    "params_hash",
    "flatten",
]

STAGES = ("prepare", "evolve", "metagrad", "maml", "evaluate")


def load_params(path: str | Path = "params.yaml") -> PipelineConfig:
    """Read and validate a params file (a profile overlay is merged onto its base first, see
    ``pipeline.profiles``); raise ConfigError with one line per bad key."""
    from ..profiles import read_params  # profiles builds on this module

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
