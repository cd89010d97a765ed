"""No-op-start Atari evaluation of the trained agents, human-normalised.

Protocol (Mnih et al. 2015; IMPALA; meta-gradient RL): each episode starts with k ~ U{1..30} no-ops,
then actions are sampled from the policy; episodes end at game over or at 108 000 frames; scores are
raw (unclipped) game scores. All episodes of a game run in parallel in one vector env.
"""

from __future__ import annotations

import logging
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


def evaluate_agents(
    model_paths: dict[str, dict[str, dict[int, Path]]],
    scores_table: dict,
    config: AtariEvalConfig,
    seed: int,
    confidence: float,
) -> dict:
    """``model_paths[game][variant][training seed]`` -> scores per cell, per (game, variant) over seeds,
    paired differences with the baseline, and the median HNS over games per variant.

    Every agent plays the same seeded episodes (``seed``): variants and training seeds are compared on
    common random numbers. Per (game, variant): mean raw score and HNS over training seeds with
    Student-t CIs over seeds; per variant other than ``impala``: the paired difference variant − impala
    of the per-seed mean scores, over the seeds both have.
    """
    per_game: dict[str, dict] = {}
    hns_by_variant: dict[str, dict[str, float]] = {}
    for game, variants in model_paths.items():
        if game not in scores_table["games"]:
            raise ValueError(f"no random/human scores for {game!r} in the Atari-57 table")
        reference = scores_table["games"][game]
        per_game[game] = {}
        for variant, seeds in variants.items():
            cells = {
                train_seed: score_agent(path, game, config, seed, confidence, reference)
                for train_seed, path in seeds.items()
            }
            per_game[game][variant] = summarize_seeds(cells, confidence)
            hns_by_variant.setdefault(variant, {})[game] = per_game[game][variant]["hns"]
        baseline = per_game[game].get("impala")
        for variant, row in per_game[game].items():
            if baseline is not None and variant != "impala":
                row["diff_vs_impala"] = paired_difference(row["seeds"], baseline["seeds"], confidence)
    return {
        "games": per_game,
        "reference_scores": {game: scores_table["games"][game] for game in per_game},
        "hns": {variant: aggregate_hns(values) for variant, values in hns_by_variant.items()},
        "paper_median_hns_percent": PAPER_MEDIAN_HNS,
        "confidence": confidence,
    }


def score_agent(
    path: Path, game: str, config: AtariEvalConfig, seed: int, confidence: float, reference: dict
) -> dict:
    """One cell's agent: its no-op-start episodes, mean raw score with a CI over episodes, HNS."""
    net, eta, checkpoint = load_agent(path)
    env_config = AtariEnvConfig(**checkpoint["metagrad_config"]["env"])  # as the agent was trained
    log.info("%s: %d no-op episodes", path, config.episodes)
    played = play_episodes(net, eta, game, config, env_config, seed)
    interval = mean_ci(played["scores"], confidence)
    return {
        "mean_score": interval.mean,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "hns": human_normalized(interval.mean, reference["random"], reference["human"]),
        "train_frames": checkpoint["frames"],
        "gamma": float(eta[0]),
        "lambda": float(eta[1]),
        **played,
    }


def summarize_seeds(cells: dict[int, dict], confidence: float) -> dict:
    """Mean raw score and HNS over training seeds, each with its CI over seeds; the cells under "seeds"."""
    ordered = dict(sorted(cells.items()))
    score = mean_ci([c["mean_score"] for c in ordered.values()], confidence)
    hns = mean_ci([c["hns"] for c in ordered.values()], confidence)
    return {
        "mean_score": score.mean,
        "ci_low": score.low,
        "ci_high": score.high,
        "hns": hns.mean,
        "hns_ci_low": hns.low,
        "hns_ci_high": hns.high,
        "num_seeds": len(ordered),
        "episodes": sum(len(c["scores"]) for c in ordered.values()),
        "train_frames": min(c["train_frames"] for c in ordered.values()),
        "gamma": float(np.mean([c["gamma"] for c in ordered.values()])),
        "lambda": float(np.mean([c["lambda"] for c in ordered.values()])),
        "seeds": {str(k): c for k, c in ordered.items()},
    }


def paired_difference(cells: dict[str, dict], baseline: dict[str, dict], confidence: float) -> dict:
    """Mean over shared training seeds of (cell score − baseline score), with its Student-t CI."""
    shared = [k for k in cells if k in baseline]
    diffs = {k: cells[k]["mean_score"] - baseline[k]["mean_score"] for k in shared}
    interval = mean_ci(diffs.values(), confidence)
    return {
        "mean": interval.mean,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "seeds": len(shared),
        "per_seed": diffs,
    }
