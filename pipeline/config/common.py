"""What every stage's config shares: the one list per concept, the field types, ``Frozen`` and the
prepare stage's config (ALE games and task families)."""

from __future__ import annotations

import difflib
import functools
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    "maml": "MAML θ₀ (K inner steps, then PG)",
    "pretrained": "pretrained on all training tasks, then PG",
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
