"""Training loop of the metagrad stage: synchronous batched actor-learner on N Atari envs.

Per update: the actor unrolls T steps in all N envs with the current policy, then the learner takes
one (meta-)update on that rollout. Every ``checkpoint_every`` updates the whole training state goes to
a persistent checkpoint, so a killed stage resumes where it stopped and keeps its MLflow run.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import MetagradConfig, params_hash
from ..devices import resolve_device
from ..envs.atari import AtariStepper
from ..io import torch_load, torch_save
from ..stage import code_fingerprint
from .learner import MetaGradientLearner, Rollout

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 60


def limit_cpu_threads_for(device: torch.device) -> None:
    """On a GPU the CPU only copies frames and launches kernels: one torch thread, so that torch's
    spinning thread pool does not take cores from ALE's emulator threads. Measured on an H100 machine
    (16 cores, paper profile, bench/atari_throughput.py): 24 073 frames/s end to end with 1 thread,
    11 519 with torch's default 16 (README "On a GPU")."""
    if device.type == "cuda" and torch.get_num_threads() != 1:
        log.info(
            "device %s: torch CPU threads %d -> 1 (ALE's threads keep the cores)",
            device,
            torch.get_num_threads(),
        )
        torch.set_num_threads(1)


def variant_seed(seed: int, game: str) -> int:
    """Same seed for every variant of a game: the variants differ only in what is meta-learned."""
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(game))) % 2**31


class Actor:
    """Unrolls the current policy in a vector env and records a time-major rollout."""

    def __init__(self, stepper: AtariStepper, unroll: int, device: torch.device):
        self.stepper = stepper
        self.unroll = unroll
        self.device = device
        self.obs = torch.from_numpy(stepper.reset())

    def collect(self, learner: MetaGradientLearner) -> tuple[Rollout, np.ndarray, np.ndarray]:
        steps, batch = self.unroll, self.stepper.num_envs
        obs = torch.empty((steps + 1, *self.obs.shape), dtype=torch.uint8)
        actions = torch.empty(steps, batch, dtype=torch.int64)
        log_probs = torch.empty(steps, batch)
        rewards = torch.empty(steps, batch)
        dones = torch.empty(steps, batch, dtype=torch.bool)
        finished_returns, finished_lengths = [], []
        obs[0] = self.obs
        for t in range(steps):
            action, log_prob = learner.act(obs[t].to(self.device, non_blocking=True))
            result = self.stepper.step(action.cpu().numpy())
            actions[t], log_probs[t] = action.cpu(), log_prob.cpu()
            rewards[t] = torch.from_numpy(result.clipped_reward)
            dones[t] = torch.from_numpy(result.learn_done)
            obs[t + 1] = torch.from_numpy(result.obs)
            finished_returns.append(result.finished_returns)
            finished_lengths.append(result.finished_lengths)
        self.obs = obs[-1].clone()
        rollout = Rollout(obs, actions, log_probs, rewards, dones).to(self.device)
        return rollout, np.concatenate(finished_returns), np.concatenate(finished_lengths)


@dataclass
class History:
    """Everything plotted or reported later; saved in the checkpoint so a resume loses nothing."""

    episode_frames: list[int] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    update_frames: list[int] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)


@dataclass
class VariantResult:
    game: str
    variant: str
    frames: int
    updates: int
    episodes: int
    final_return: float | None  # mean raw return of the last 10 finished games (None: no game ended)
    gamma: float
    lambda_: float
    frames_per_second: float
    history: History


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # actions are sampled on the GPU when the learner runs there
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_variant(
    config: MetagradConfig,
    game: str,
    variant: str,
    seed: int,
    checkpoint_path: Path,
    tracker=None,
) -> tuple[VariantResult, MetaGradientLearner]:
    """Train one variant on one game for ``config.frames`` frames, resuming from ``checkpoint_path``."""
    device = resolve_device(config.device, "metagrad.device")
    frames_per_update = config.num_envs * config.unroll * config.env.frameskip
    total_updates = max(1, -(-config.frames // frames_per_update))
    config_hash = params_hash(
        {"metagrad": config.model_dump(mode="json"), "seed": seed, "game": game, "code": code_fingerprint()}
    )

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    stepper = AtariStepper(game, config.num_envs, config.env, seed=seed, reward_clip=config.reward_clip)
    learner = MetaGradientLearner(config, variant, stepper.num_actions, total_updates, device)
    history, updates, frames, elapsed = History(), 0, 0, 0.0

    if checkpoint_path.exists():
        state = torch_load(checkpoint_path)
        if state.get("config_hash") == config_hash:
            learner.load_state_dict(state["learner"])
            history, updates, frames = History(**state["history"]), state["updates"], state["frames"]
            elapsed = state.get("elapsed", 0.0)
            set_rng_state(state["rng"])
            log.info("%s/%s: resumed from %s at %d frames", game, variant, checkpoint_path, frames)
        else:
            log.info("%s/%s: checkpoint is for other params; starting over", game, variant)

    def save_checkpoint(done: bool) -> None:
        torch_save(
            checkpoint_path,
            {
                "config_hash": config_hash,
                "learner": learner.state_dict(),
                "history": history.__dict__,
                "updates": updates,
                "frames": frames,
                "elapsed": elapsed,
                "rng": rng_state(),
                "done": done,
            },
        )
        if tracker is not None:
            tracker.flush_metrics()

    actor = Actor(stepper, config.unroll, device) if frames < config.frames else None
    recent = deque(history.episode_returns[-10:], maxlen=10)
    progress = tqdm(
        total=config.frames,
        initial=frames,
        unit="frame",
        unit_scale=True,
        desc=f"{game}/{variant}",
        mininterval=2.0,
        disable=None,
    )
    start = time.perf_counter() - elapsed
    last_log = time.perf_counter()
    try:
        while frames < config.frames:
            rollout, returns, _lengths = actor.collect(learner)
            stats = learner.update(rollout)
            updates += 1
            frames += frames_per_update
            elapsed = time.perf_counter() - start
            for value in returns:
                history.episode_frames.append(frames)
                history.episode_returns.append(float(value))
                recent.append(float(value))
            history.update_frames.append(frames)
            history.gammas.append(stats["gamma"])
            history.lambdas.append(stats["lambda"])
            fps = frames / max(elapsed, 1e-9)
            if tracker is not None:  # the cell's own run: one metric name per quantity across cells
                metrics = {**stats, "frames_per_second": fps}
                if len(returns):
                    metrics["episode_return"] = float(np.mean(returns))
                tracker.queue_metrics(metrics, step=frames)
                if updates % config.log_every == 0:
                    tracker.flush_metrics()
            progress.update(frames_per_update)
            progress.set_postfix(
                fps=f"{fps:.0f}",
                ret=f"{np.mean(recent):.1f}" if recent else "-",
                gamma=f"{stats['gamma']:.4f}",
                lam=f"{stats['lambda']:.3f}",
                refresh=False,
            )
            if updates % config.checkpoint_every == 0:
                save_checkpoint(done=False)
            if time.perf_counter() - last_log > PROGRESS_LOG_SECONDS:  # progress in logs, not only the bar
                last_log = time.perf_counter()
                log.info(
                    "%s/%s: %d/%d frames, %.0f frames/s, last-10 return %s, gamma %.4f, lambda %.4f",
                    game,
                    variant,
                    frames,
                    config.frames,
                    fps,
                    f"{np.mean(recent):.1f}" if recent else "-",
                    stats["gamma"],
                    stats["lambda"],
                )
        save_checkpoint(done=True)
    finally:
        progress.close()
        stepper.close()

    eta = learner.eta().detach().cpu()
    return VariantResult(
        game=game,
        variant=variant,
        frames=frames,
        updates=updates,
        episodes=len(history.episode_returns),
        final_return=float(np.mean(history.episode_returns[-10:])) if history.episode_returns else None,
        gamma=float(eta[0]),
        lambda_=float(eta[1]),
        frames_per_second=frames / max(elapsed, 1e-9),
        history=history,
    ), learner


def export_model(
    learner: MetaGradientLearner, result: VariantResult, config: MetagradConfig, target: Path
) -> Path:
    """The trained agent, with everything the evaluate stage needs to rebuild and run it."""
    return torch_save(
        target,
        {
            "state_dict": learner.net.state_dict(),
            "network": config.network,
            "num_actions": learner.net.num_actions,
            "stack": config.env.stack,
            "embedding_dim": config.meta.embedding_dim,
            "eta": [result.gamma, result.lambda_],
            "game": result.game,
            "variant": result.variant,
            "frames": result.frames,
            "metagrad_config": config.model_dump(mode="json", by_alias=True),
        },
    )
