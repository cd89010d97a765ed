"""Does the evolved loss train fresh policies well? Held-out and out-of-distribution tasks.

Every method trains fresh policies with the *same* inner loop the loss was evolved with (same env-step
budget, update schedule, architecture): the evolved loss, PPO, vanilla policy gradient (REINFORCE with a
learned baseline), and a randomly initialised loss network as a floor. Lifetimes are (task, seed) pairs
and every method meets the same pairs with the same random numbers (a paired comparison). All lifetimes
of a method run as one batched call of ``run_lifetimes``; the two loss networks share one call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import EpgEvalConfig, InnerLoopConfig, LossNetConfig, evaluation_lifetime
from ..devices import keep_freed_cpu_memory, resolve_device
from ..epg.inner import LossSetting, run_lifetimes
from ..epg.loss_net import initial_phi
from ..io import torch_load
from ..seeding import derived_seed
from .compare import LifetimeCurves, epg_curves
from .stats import Interval, mean_ci

log = logging.getLogger(__name__)


def load_loss(reference: str, root: Path) -> tuple[dict, str | None]:
    """Load an evolved loss from a file or a registry URI; returns (loss, registry version or None)."""
    if reference.startswith("models:/"):
        from ..registry import download_loss, parse_model_uri, resolve_version

        name, ref = parse_model_uri(reference)
        version = resolve_version(name, ref, root)
        return torch_load(download_loss(f"models:/{name}/{version.version}", root)), str(version.version)
    path = Path(reference) if Path(reference).is_absolute() else root / reference
    if not path.exists():
        raise FileNotFoundError(f"evaluate.epg.loss: no loss file at {path}")
    return torch_load(path), None


def evaluation_lifetimes(tasks: list[dict], seeds: int) -> list[dict]:
    """One lifetime per (seed, task): the task list repeated ``seeds`` times (seed-major)."""
    return [task for _ in range(seeds) for task in tasks]


@dataclass(frozen=True)
class CurvePoint:
    """The mean learning curve at one point of the lifetime, with its CI over lifetimes."""

    env_steps: int
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class MethodResult:
    """One method on one split: mean final return with its CI, lifetime counts, learning curve."""

    mean: float
    ci_low: float
    ci_high: float
    lifetimes: int
    finite_lifetimes: int
    nonfinite_lifetimes: int
    curve: list[CurvePoint] = field(default_factory=list)


@dataclass(frozen=True)
class EpgEvaluation:
    """Every method's result per split (``splits[split][method]``), and what the lifetimes were."""

    family: str
    env_steps_per_lifetime: int  # the evaluation budget (evaluate.epg.lifetime_steps)
    seeds: int
    tasks_per_split: dict[str, int]
    splits: dict[str, dict[str, MethodResult]]
    evolved_lifetime_steps: int  # the lifetime the loss was evolved with

    def mean_return(self, split: str, method: str) -> float:
        """The method's mean final return on the split; nan where it was not evaluated."""
        result = self.splits.get(split, {}).get(method)
        return result.mean if result is not None else math.nan

    def to_dict(self) -> dict:
        return asdict(self)


def curve_summary(curve: torch.Tensor, steps: list[int], points: int, confidence: float) -> list[CurvePoint]:
    """Mean learning curve with CIs over lifetimes, thinned to about ``points`` points."""
    if curve.numel() == 0:
        return []
    stride = max(1, math.ceil(len(steps) / points))
    rows = []
    for index in range(stride - 1, len(steps), stride):
        interval = mean_ci(curve[index].reshape(-1).tolist(), confidence)
        rows.append(CurvePoint(steps[index], interval.mean, interval.low, interval.high))
    return rows


def summarise(
    returns: torch.Tensor, nonfinite: torch.Tensor, confidence: float, curve: list[CurvePoint]
) -> MethodResult:
    interval: Interval = mean_ci(returns.reshape(-1).tolist(), confidence)
    return MethodResult(
        mean=interval.mean,
        ci_low=interval.low,
        ci_high=interval.high,
        lifetimes=int(returns.numel()),
        finite_lifetimes=interval.n,
        nonfinite_lifetimes=int(nonfinite.sum()),
        curve=curve,
    )


def _evaluate_split(
    loss: dict,
    inner: InnerLoopConfig,
    loss_net: LossNetConfig,
    config: EpgEvalConfig,
    phis: dict[str, torch.Tensor],
    split: str,
    tasks: list[dict],
    crn_seed: int,
    device: torch.device,
) -> tuple[dict[str, MethodResult], dict[str, LifetimeCurves]]:
    """Every method on one split's (task, seed) lifetimes, with the same random numbers: the loss
    networks in one batched call, then PPO and PG. Returns the summaries and the per-lifetime curves."""
    lifetimes = evaluation_lifetimes(tasks[: config.max_tasks_per_split], config.seeds)
    settings = {}
    if phis:
        settings[tuple(phis)] = LossSetting("epg", phi=torch.stack(list(phis.values())))
    for method in ("ppo", "pg"):  # maml and pretrained: adapt_eval
        if method in config.methods:
            settings[(method,)] = LossSetting(method, num_members=1)
    results, curves = {}, {}
    for names, setting in settings.items():
        log.info("%s: training %d x %d lifetimes with %s", split, len(names), len(lifetimes), list(names))
        result = run_lifetimes(loss["family"], lifetimes, inner, setting, loss_net, crn_seed, device)
        for index, name in enumerate(names):
            curve = curve_summary(
                result.curve[:, index], result.curve_steps, config.curve_points, config.confidence
            )
            results[name] = summarise(
                result.final_returns[index], result.nonfinite[index], config.confidence, curve
            )
            curves[name] = epg_curves(result.curve[:, index], result.curve_steps, inner.update_every)
    return results, curves


def evaluate_loss_curves(
    loss: dict,
    splits: dict[str, list[dict]],
    config: EpgEvalConfig,
    seed: int,
    extra_losses: dict[str, torch.Tensor] | None = None,
) -> tuple[EpgEvaluation, dict[str, dict[str, LifetimeCurves]]]:
    """Final returns (with CIs) and learning curves per split and method, and every method's
    per-lifetime curves per split (``curves[split][method]``, for the comparison with MAML). Every
    lifetime runs for ``config.lifetime_steps`` env steps (the loss's own lifetime when null) with the
    loss's inner loop otherwise unchanged.

    ``extra_losses`` adds more loss networks of the same architecture (e.g. the registry champion) to
    the batched call, evaluated on exactly the same lifetimes.
    """
    budget = evaluation_lifetime(config.lifetime_steps, InnerLoopConfig(**loss["inner"]))
    inner = InnerLoopConfig(**{**loss["inner"], "fitness": "final_episodes", "lifetime_steps": budget})
    loss_net = LossNetConfig(**loss["loss_net"])
    device = resolve_device(config.device, "evaluate.epg.device")
    keep_freed_cpu_memory()  # the lifetimes reuse multi-MB activations on every update
    phis = {}
    if "evolved" in config.methods:
        phis["evolved"] = loss["phi"].float()
    if "random_loss" in config.methods:
        phis["random_loss"] = initial_phi(loss["input_dim"], loss_net, derived_seed(seed, "random_loss"))
    phis.update(extra_losses or {})
    per_split = {
        split: _evaluate_split(
            loss,
            inner,
            loss_net,
            config,
            phis,
            split,
            splits[split],
            derived_seed(seed, "evaluate", split),
            device,
        )
        for split in config.splits
    }
    evaluation = EpgEvaluation(
        family=loss["family"],
        env_steps_per_lifetime=inner.lifetime_steps,
        evolved_lifetime_steps=int(loss["inner"]["lifetime_steps"]),
        seeds=config.seeds,
        tasks_per_split={
            split: min(len(splits[split]), config.max_tasks_per_split) for split in config.splits
        },
        splits={split: results for split, (results, _) in per_split.items()},
    )
    return evaluation, {split: curves for split, (_, curves) in per_split.items()}
