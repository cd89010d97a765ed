"""No-op-start Atari evaluation of the trained agents, human-normalised.

Protocol (Mnih et al. 2015; IMPALA; meta-gradient RL): each episode starts with k ~ U{1..30} no-ops,
then actions are sampled from the policy; episodes end at game over or at 108 000 frames; scores are
raw (unclipped) game scores. All episodes of a game run in parallel in one vector env.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import AtariEnvConfig, AtariEvalConfig
from ..envs.atari import AtariStepper, NoopStarts
from ..io import torch_load
from ..nets.atari import AtariActorCritic
from .stats import aggregate_hns, human_normalized, mean_ci

log = logging.getLogger(__name__)

# Median human-normalised scores over 57 games after 200M frames, no-op starts, gamma_bar = 0.99
# (Xu, van Hasselt & Silver 2018, Table 1). Reference values only: not produced by this pipeline.
PAPER_MEDIAN_HNS = {"impala": 191.8, "lambda": 185.5, "gamma": 280.9, "gamma_lambda": 242.6}


def load_agent(path: Path) -> tuple[AtariActorCritic, torch.Tensor, dict]:
    checkpoint = torch_load(path)
    net = AtariActorCritic(
        checkpoint["num_actions"], checkpoint["network"], checkpoint["stack"], checkpoint["embedding_dim"]
    )
    net.load_state_dict(checkpoint["state_dict"])
    net.eval()
    return net, torch.tensor(checkpoint["eta"], dtype=torch.float32), checkpoint


@torch.no_grad()
def play_episodes(
    net: AtariActorCritic,
    eta: torch.Tensor,
    game: str,
    config: AtariEvalConfig,
    env_config: AtariEnvConfig,
    seed: int,
) -> dict:
    """Play ``config.episodes`` no-op-start episodes in parallel; raw scores, no-op counts, lengths."""
    episodes = config.episodes
    # ALE's own no-op starts are off: ours are seeded and recorded.
    stepper = AtariStepper(
        game, episodes, env_config, seed=seed, noop_max=0, max_episode_frames=config.max_episode_frames
    )
    noops = NoopStarts(episodes, config.noop_max, seed)
    first_noops = noops.remaining.copy()
    generator = torch.Generator().manual_seed(seed)
    scores = np.full(episodes, np.nan)
    lengths = np.zeros(episodes, dtype=np.int64)
    try:
        obs = stepper.reset()
        while np.isnan(scores).any():
            logits, _ = net(torch.from_numpy(obs), eta)
            actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            step = stepper.step(noops.apply(actions.numpy()))
            ended = np.flatnonzero(step.game_over)
            for slot, env_index in enumerate(ended):
                if np.isnan(scores[env_index]):
                    scores[env_index] = step.finished_returns[slot]
                    lengths[env_index] = step.finished_lengths[slot]
            noops.new_games(step.game_over)
            obs = step.obs
    finally:
        stepper.close()
    return {"scores": scores.tolist(), "noops": first_noops.tolist(), "lengths": lengths.tolist()}


@dataclass(frozen=True)
class AgentScore:
    """One trained agent's no-op-start evaluation: raw scores with their CI, HNS, what it had learned."""

    mean_score: float
    ci_low: float
    ci_high: float
    hns: float
    train_frames: int
    gamma: float
    lambda_: float
    scores: list[float]
    noops: list[int]
    lengths: list[int]

    def to_dict(self) -> dict:
        data = asdict(self)
        # the same keys as the params and the metrics: "lambda"
        return {("lambda" if key == "lambda_" else key): value for key, value in data.items()}


@dataclass(frozen=True)
class AtariEvaluation:
    """``games[game][variant]`` scores, the reference table rows used, HNS aggregated per variant."""

    games: dict[str, dict[str, AgentScore]]
    reference_scores: dict[str, dict[str, float]]
    hns: dict[str, dict[str, float]]  # variant -> {"median", "mean", "games"}
    paper_median_hns_percent: dict[str, float] = field(default_factory=lambda: dict(PAPER_MEDIAN_HNS))

    def to_dict(self) -> dict:
        return {
            "games": {
                game: {variant: score.to_dict() for variant, score in variants.items()}
                for game, variants in self.games.items()
            },
            "reference_scores": self.reference_scores,
            "hns": self.hns,
            "paper_median_hns_percent": self.paper_median_hns_percent,
        }


def evaluate_agents(
    model_paths: dict[str, dict[str, Path]],
    scores_table: dict,
    config: AtariEvalConfig,
    seed: int,
    confidence: float,
) -> AtariEvaluation:
    """``model_paths[game][variant]`` -> raw scores, HNS per game and variant, median/mean HNS."""
    per_game: dict[str, dict[str, AgentScore]] = {}
    hns_by_variant: dict[str, dict[str, float]] = {}
    for game, variants in model_paths.items():
        if game not in scores_table["games"]:
            raise ValueError(f"no random/human scores for {game!r} in the Atari-57 table")
        reference = scores_table["games"][game]
        per_game[game] = {}
        for variant, path in variants.items():
            net, eta, checkpoint = load_agent(path)
            env_config = AtariEnvConfig(**checkpoint["metagrad_config"]["env"])  # as the agent was trained
            log.info("%s/%s: %d no-op episodes", game, variant, config.episodes)
            played = play_episodes(net, eta, game, config, env_config, seed)
            interval = mean_ci(played["scores"], confidence)
            hns = human_normalized(interval.mean, reference["random"], reference["human"])
            per_game[game][variant] = AgentScore(
                mean_score=interval.mean,
                ci_low=interval.low,
                ci_high=interval.high,
                hns=hns,
                train_frames=checkpoint["frames"],
                gamma=float(eta[0]),
                lambda_=float(eta[1]),
                **played,
            )
            hns_by_variant.setdefault(variant, {})[game] = hns
    return AtariEvaluation(
        games=per_game,
        reference_scores={game: scores_table["games"][game] for game in per_game},
        hns={variant: aggregate_hns(values) for variant, values in hns_by_variant.items()},
    )
