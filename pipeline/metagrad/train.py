"""Training loop of the metagrad stage: synchronous batched actor-learner on N Atari envs.

Per update: the actor unrolls T steps in all N envs with the current policy, then the learner takes
one (meta-)update on that rollout. Every ``checkpoint_every`` updates the whole training state (learner,
RNGs, emulators, curves) goes to a persistent checkpoint (``stage.Checkpointer``), so a killed stage
resumes where it stopped, keeps its MLflow run and ends with the same model as an uninterrupted run.
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
from ..envs.atari import AtariStepper, ReplayMismatch
from ..io import torch_save
from ..stage import Checkpointer, code_fingerprint
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


class Actor:
    """Unrolls the current policy in a vector env and records a time-major rollout."""

    def __init__(
        self, stepper: AtariStepper, unroll: int, device: torch.device, obs: np.ndarray | None = None
    ):
        """``obs``: the envs' current frames (a restored stepper); by default the envs are reset."""
        self.stepper = stepper
        self.unroll = unroll
        self.device = device
        self.obs = torch.from_numpy(stepper.reset() if obs is None else obs)

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


def train_variant(
    config: MetagradConfig,
    game: str,
    variant: str,
    seed: int,
    checkpoint_path: Path,
    tracker=None,
) -> tuple[VariantResult, MetaGradientLearner]:
    """Train one variant on one game for ``config.frames`` frames, resuming from ``checkpoint_path``.

    The checkpoint holds the learner (with a pending meta step), the RNGs and the emulators (see
    ``AtariStepper.state``): a resumed run is bit for bit the uninterrupted one."""
    device = resolve_device(config.device, "metagrad.device")
    key = params_hash(
        {
            "metagrad": config.model_dump(mode="json"),
            "seed": seed,
            "game": game,
            "code": code_fingerprint("metagrad"),
        }
    )
    checkpointer = Checkpointer(checkpoint_path, key)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    stepper = AtariStepper(game, config.num_envs, config.env, seed=seed, reward_clip=config.reward_clip)
    try:
        learner, loop = resume(config, variant, stepper, checkpointer, device)
    except ReplayMismatch as err:
        stepper.close()
        log.warning("%s/%s: %s; starting over", game, variant, err)
        checkpointer.discard(reason="its emulators cannot be replayed")
        return train_variant(config, game, variant, seed, checkpoint_path, tracker)
    try:
        loop.run(config, learner, checkpointer, tracker, f"{game}/{variant}")
    finally:
        stepper.close()

    eta = learner.eta().detach().cpu()
    history = loop.history
    return VariantResult(
        game=game,
        variant=variant,
        frames=loop.frames,
        updates=loop.updates,
        episodes=len(history.episode_returns),
        final_return=float(np.mean(history.episode_returns[-10:])) if history.episode_returns else None,
        gamma=float(eta[0]),
        lambda_=float(eta[1]),
        frames_per_second=loop.frames / max(loop.elapsed, 1e-9),
        history=history,
    ), learner


def resume(
    config: MetagradConfig, variant: str, stepper: AtariStepper, checkpointer: Checkpointer, device
) -> tuple[MetaGradientLearner, TrainingLoop]:
    """A learner and a loop as the checkpoint left them (RNGs and emulators too), else fresh ones."""
    frames_per_update = config.num_envs * config.unroll * config.env.frameskip
    total_updates = max(1, -(-config.frames // frames_per_update))
    learner = MetaGradientLearner(config, variant, stepper.num_actions, total_updates, device)
    loop = TrainingLoop(stepper, frames_per_update)
    state = checkpointer.restore()
    if state is None:
        loop.actor = Actor(stepper, config.unroll, device) if config.frames > 0 else None
        return learner, loop
    learner.load_state_dict(state["learner"])
    if learner.learned and config.meta.grad_mode == "naive" and state["learner"].get("pending") is None:
        log.warning(
            "naive meta-gradients keep an autograd graph that is not checkpointed: the meta step "
            "pending at %s is skipped, so this run differs from an uninterrupted one",
            checkpointer.path,
        )
    loop.history, loop.updates = History(**state["history"]), state["updates"]
    loop.frames, loop.elapsed = state["frames"], state["elapsed"]
    if loop.frames < config.frames:
        loop.actor = Actor(stepper, config.unroll, device, obs=stepper.restore(state["env"]))
    log.info("%s: resumed from %s at %d frames", variant, checkpointer.path, loop.frames)
    return learner, loop


@dataclass
class TrainingLoop:
    """Counters and curves of one variant's training, and the loop that advances them."""

    stepper: AtariStepper
    frames_per_update: int
    actor: Actor | None = None
    history: History = field(default_factory=History)
    updates: int = 0
    frames: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumes

    def snapshot(self, learner: MetaGradientLearner, done: bool) -> dict:
        return {
            "learner": learner.state_dict(),
            "history": self.history.__dict__,
            "updates": self.updates,
            "frames": self.frames,
            "elapsed": self.elapsed,
            "done": done,
            "env": None if done else self.stepper.state(),
        }

    def run(self, config: MetagradConfig, learner, checkpointer: Checkpointer, tracker, name: str) -> None:
        def save(done: bool):
            def state() -> dict:
                if tracker is not None:
                    tracker.flush_metrics()
                return self.snapshot(learner, done)

            return state

        recent = deque(self.history.episode_returns[-10:], maxlen=10)
        progress = tqdm(
            total=config.frames,
            initial=self.frames,
            unit="frame",
            unit_scale=True,
            desc=name,
            mininterval=2.0,
            disable=None,
        )
        start = time.perf_counter() - self.elapsed
        last_log = time.perf_counter()
        with checkpointer.deferring_stop(), progress:
            while self.frames < config.frames:
                rollout, returns, _lengths = self.actor.collect(learner)
                stats = learner.update(rollout)
                self.updates += 1
                self.frames += self.frames_per_update
                self.elapsed = time.perf_counter() - start
                self.record(stats, returns, recent, tracker, config, name)
                progress.update(self.frames_per_update)
                progress.set_postfix(
                    fps=f"{self.frames / max(self.elapsed, 1e-9):.0f}",
                    ret=f"{np.mean(recent):.1f}" if recent else "-",
                    gamma=f"{stats['gamma']:.4f}",
                    lam=f"{stats['lambda']:.3f}",
                    refresh=False,
                )
                checkpointer.safe_point(save(done=False), due=self.updates % config.checkpoint_every == 0)
                if time.perf_counter() - last_log > PROGRESS_LOG_SECONDS:  # in logs, not only the bar
                    last_log = time.perf_counter()
                    self.log_progress(config, stats, recent, name)
            if self.actor is not None:  # else resumed from the final checkpoint: nothing new to save
                checkpointer.save(save(done=True)())

    def record(self, stats: dict, returns: np.ndarray, recent: deque, tracker, config, name: str) -> None:
        history = self.history
        for value in returns:
            history.episode_frames.append(self.frames)
            history.episode_returns.append(float(value))
            recent.append(float(value))
        history.update_frames.append(self.frames)
        history.gammas.append(stats["gamma"])
        history.lambdas.append(stats["lambda"])
        if tracker is not None:
            # the cell's own run: one metric name per quantity across cells
            metrics = {**stats, "frames_per_second": self.frames / max(self.elapsed, 1e-9)}
            if len(returns):
                metrics["episode_return"] = float(np.mean(returns))
            tracker.queue_metrics(metrics, step=self.frames)
            if self.updates % config.log_every == 0:
                tracker.flush_metrics()

    def log_progress(self, config: MetagradConfig, stats: dict, recent: deque, name: str) -> None:
        log.info(
            "%s: %d/%d frames, %.0f frames/s, last-10 return %s, gamma %.4f, lambda %.4f",
            name,
            self.frames,
            config.frames,
            self.frames / max(self.elapsed, 1e-9),
            f"{np.mean(recent):.1f}" if recent else "-",
            stats["gamma"],
            stats["lambda"],
        )


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
