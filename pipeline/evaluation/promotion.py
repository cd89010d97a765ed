"""Promotion in the Model Registry: an alias (``champion``) moves only to a better held-out return.

The rule is the same for every registered model (evolved losses, MAML policies); ``promote_version``
applies it through ``pipeline.registry``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple


class Decision(NamedTuple):
    promote: bool
    reason: str


def decide_promotion(candidate_return: float, champion_return: float | None) -> Decision:
    """Promote when there is no champion, or the candidate's held-out return is strictly higher."""
    if not math.isfinite(candidate_return):
        return Decision(False, f"candidate's held-out return is not finite ({candidate_return})")
    if champion_return is None or not math.isfinite(champion_return):
        return Decision(True, "there is no champion with a held-out return yet")
    if candidate_return > champion_return:
        return Decision(
            True, f"held-out return {candidate_return:.4g} beats the champion's {champion_return:.4g}"
        )
    return Decision(
        False, f"held-out return {candidate_return:.4g} does not beat the champion's {champion_return:.4g}"
    )


def promote_version(
    model_name: str,
    version: str,
    alias: str,
    candidate_return: float,
    champion_return: float | None,
    root: Path | None = None,
) -> Decision:
    """Decide by ``decide_promotion``; when it promotes, point ``alias`` of ``model_name`` at ``version``."""
    from .. import registry

    decision = decide_promotion(candidate_return, champion_return)
    if decision.promote:
        registry.set_alias(model_name, version, alias, root)
    return decision
