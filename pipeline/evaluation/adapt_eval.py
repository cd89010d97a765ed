"""MAML's θ₀ and the pretrained policy on the evaluation lifetimes: K inner steps, then the same
policy-gradient steps to the end of the env-step budget (``pipeline.maml.evaluation``).

Both meet the very lifetimes the EPG methods meet: the first ``max_tasks_per_split`` tasks of a split
times ``seeds`` seeds, seed-major, for ``inner.lifetime_steps`` env steps each.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import EpgEvalConfig
from ..devices import resolve_device
from ..io import torch_load
from ..seeding import derived_seed
from .compare import ADAPTING, LifetimeCurves

log = logging.getLogger(__name__)


def load_policy(method: str, path: Path, family: str) -> dict:
    """The policy file of ``method`` (``maml`` or ``pretrained``), checked against the loss's family."""
    if not path.exists():
        raise FileNotFoundError(
            f"evaluate.epg.methods lists {method!r} but {path} does not exist: run the maml stage "
            f"(dvc repro maml) or drop {method!r} from evaluate.epg.methods"
        )
    policy = torch_load(path)
    if policy.get("family") != family:
        raise ValueError(
            f"{path}: policy of family {policy.get('family')!r}, the evolved loss's is {family!r}; "
            f"set maml.family to evolve.family ({family}) or drop {method!r} from evaluate.epg.methods"
        )
    return policy


def return_ceiling(policy: dict) -> float | None:
    """The largest episode return the policy's evaluation episodes can reach: the family's bound on one
    step's reward times the episode length (``maml.horizon``, at most the family's own limit); None where
    the family's reward is unbounded or not known."""
    from ..envs.tasks import FAMILIES

    env = FAMILIES[policy["family"]]
    if env.max_step_reward is None:
        return None
    return env.max_step_reward * min(policy["maml"]["horizon"], env.max_episode_steps)


def adapting_curves(
    policies: dict[str, Path],
    family: str,
    splits: dict[str, list[dict]],
    config: EpgEvalConfig,
    budget: int,
    seed: int,
) -> tuple[dict[str, dict[str, LifetimeCurves]], int | None, float | None]:
    """``curves[split][method]`` for the listed adapting methods, K (MAML's inner steps; None when
    neither ran) and MAML's return ceiling (``return_ceiling``). ``policies`` maps each adapting method
    to its policy file."""
    from ..maml.evaluation import adaptation_curves  # MAML is only imported when it is evaluated

    methods = [m for m in ADAPTING if m in config.methods]
    loaded = {m: load_policy(m, policies[m], family) for m in methods}
    device = resolve_device(config.device, "evaluate.epg.device")
    curves: dict[str, dict[str, LifetimeCurves]] = {split: {} for split in config.splits}
    inner_steps = None
    for split in config.splits:
        tasks = splits[split][: config.max_tasks_per_split]
        for method, policy in loaded.items():
            log.info("%s: adapting %s over %d x %d lifetimes", split, method, config.seeds, len(tasks))
            result = adaptation_curves(
                policy, tasks, config.seeds, budget, derived_seed(seed, "adapt", split), device
            )
            curves[split][method] = LifetimeCurves(list(result.env_steps), result.returns.float().cpu())
            if method == "maml" or inner_steps is None:
                inner_steps = result.inner_steps
    ceiling = return_ceiling(loaded["maml"]) if "maml" in loaded else None
    return curves, inner_steps, ceiling
