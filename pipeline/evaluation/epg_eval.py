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
from pathlib import Path

import torch

from ..config import EpgEvalConfig, InnerLoopConfig, LossNetConfig
from ..devices import keep_freed_cpu_memory, resolve_device
from ..epg.inner import LossSetting, run_lifetimes
from ..epg.loss_net import initial_phi
from ..epg.problem import derived_seed
from ..io import torch_load
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


def curve_summary(curve: torch.Tensor, steps: list[int], points: int, confidence: float) -> list[dict]:
    """Mean learning curve with CIs over lifetimes, thinned to about ``points`` points."""
    if curve.numel() == 0:
        return []
    stride = max(1, math.ceil(len(steps) / points))
    rows = []
    for index in range(stride - 1, len(steps), stride):
        interval = mean_ci(curve[index].reshape(-1).tolist(), confidence)
        rows.append(
            {"env_steps": steps[index], "mean": interval.mean, "low": interval.low, "high": interval.high}
        )
    return rows


def summarise(returns: torch.Tensor, nonfinite: torch.Tensor, confidence: float) -> dict:
    interval: Interval = mean_ci(returns.reshape(-1).tolist(), confidence)
    return {
        "mean": interval.mean,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "lifetimes": int(returns.numel()),
        "finite_lifetimes": interval.n,
        "nonfinite_lifetimes": int(nonfinite.sum()),
    }


def evaluate_loss(
    loss: dict,
    splits: dict[str, list[dict]],
    config: EpgEvalConfig,
    seed: int,
    extra_losses: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Final returns (with CIs) and learning curves per split and method.

    ``extra_losses`` adds more loss networks of the same architecture (e.g. the registry champion) to
    the batched call, evaluated on exactly the same lifetimes.
    """
    inner = InnerLoopConfig(**{**loss["inner"], "fitness": "final_episodes"})
    loss_net = LossNetConfig(**loss["loss_net"])
    device = resolve_device(config.device, "evaluate.epg.device")
    keep_freed_cpu_memory()  # the lifetimes reuse multi-MB activations on every update
    phis = {}
    if "evolved" in config.methods:
        phis["evolved"] = loss["phi"].float()
    if "random_loss" in config.methods:
        phis["random_loss"] = initial_phi(loss["input_dim"], loss_net, derived_seed(seed, "random_loss"))
    phis.update(extra_losses or {})
    results: dict[str, dict] = {}
    for split in config.splits:
        tasks = splits[split][: config.max_tasks_per_split]
        lifetimes = evaluation_lifetimes(tasks, config.seeds)
        crn_seed = derived_seed(seed, "evaluate", split)
        runs = {}
        if phis:
            names = list(phis)
            log.info("%s: training %d x %d lifetimes with %s", split, len(names), len(lifetimes), names)
            result = run_lifetimes(
                loss["family"],
                lifetimes,
                inner,
                LossSetting("epg", phi=torch.stack([phis[n] for n in names])),
                loss_net,
                crn_seed,
                device,
            )
            for index, name in enumerate(names):
                runs[name] = (result, index)
        for method in ("ppo", "pg"):
            if method in config.methods:
                log.info("%s: training %d lifetimes with %s", split, len(lifetimes), method)
                result = run_lifetimes(
                    loss["family"],
                    lifetimes,
                    inner,
                    LossSetting(method, num_members=1),
                    loss_net,
                    crn_seed,
                    device,
                )
                runs[method] = (result, 0)
        results[split] = {
            name: {
                **summarise(result.final_returns[index], result.nonfinite[index], config.confidence),
                "curve": curve_summary(
                    result.curve[:, index], result.curve_steps, config.curve_points, config.confidence
                ),
            }
            for name, (result, index) in runs.items()
        }
    return {
        "family": loss["family"],
        "env_steps_per_lifetime": inner.lifetime_steps,
        "seeds": config.seeds,
        "tasks_per_split": {
            split: min(len(splits[split]), config.max_tasks_per_split) for split in config.splits
        },
        "splits": results,
    }
