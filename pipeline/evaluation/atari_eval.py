"""No-op-start Atari evaluation of the trained agents, human-normalised.

Protocol (Mnih et al. 2015; IMPALA; meta-gradient RL): each episode starts with up to 30 no-op
*frames*, then actions are sampled from the policy; episodes end at game over or at 108 000 frames;
scores are raw (unclipped) game scores. All episodes of a game run in parallel in one vector env.

The no-ops are ALE's own, one emulator frame each (k ~ U{0..noop_max-1}, drawn from the env's reset
seed), as in training and in the papers' wrappers. No-ops of whole agent steps (4 frames each) would
start every game at the same phase of the frameskip, which the agent keeps for the whole game: a Pong
agent whose training games averaged +15.6 scored +10.0 that way against +14.0 with frame no-ops
(docs/results.md, "Evaluation protocol").
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import AtariEnvConfig, AtariEvalConfig
from ..envs.atari import make_vector_env
from ..io import torch_load
from ..nets.atari import AtariActorCritic
from .stats import aggregate_hns, human_normalized, mean_ci

log = logging.getLogger(__name__)

# Median human-normalised scores over 57 games after 200M frames, no-op starts, gamma_bar = 0.99
# (Xu, van Hasselt & Silver 2018, Table 1). Reference values only: not produced by this pipeline.
PAPER_MEDIAN_HNS = {"impala": 191.8, "lambda": 185.5, "gamma": 280.9, "gamma_lambda": 242.6}
# A trained Pong agent's 30 episodes take minutes on a laptop core: say how far they are this often
# (the tqdm bar only shows on a terminal; logs and DVC's output get these lines).
PROGRESS_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class AgentScore:
    """One trained agent (game, variant, training seed) over its no-op-start episodes."""

    mean_score: float  # raw game score, mean over the episodes
    ci_low: float  # CI of the mean over the episodes
    ci_high: float
    hns: float  # human-normalised mean score (1.0 = the human reference)
    train_frames: int
    gamma: float  # the agent's eta at the end of training
    lambda_: float  # "lambda" in the JSON
    scores: list[float]  # per episode: raw score, the frame the policy first acted on, length in frames
    start_frames: list[int]  # 1 + the episode's no-op frames
    lengths: list[int]

    def to_dict(self) -> dict:
        return _json_names(asdict(self))


@dataclass(frozen=True)
class PairedDifference:
    """Mean over shared training seeds of (variant score − baseline score), with its Student-t CI."""

    mean: float
    ci_low: float
    ci_high: float
    seeds: int  # training seeds both have
    per_seed: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VariantSummary:
    """One (game, variant) over its training seeds: mean raw score and HNS, each with a CI over seeds."""

    mean_score: float
    ci_low: float
    ci_high: float
    hns: float
    hns_ci_low: float
    hns_ci_high: float
    num_seeds: int
    episodes: int  # over all seeds
    train_frames: int  # the least any seed was trained
    gamma: float  # mean over seeds
    lambda_: float  # mean over seeds; "lambda" in the JSON
    seeds: dict[str, AgentScore]  # by training seed, ascending
    diff_vs_impala: PairedDifference | None = None  # for every variant but impala, when impala ran

    def to_dict(self) -> dict:
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        data["seeds"] = {seed: cell.to_dict() for seed, cell in self.seeds.items()}
        if self.diff_vs_impala is None:
            del data["diff_vs_impala"]
        else:
            data["diff_vs_impala"] = self.diff_vs_impala.to_dict()
        return _json_names(data)

    def metrics(self) -> dict:
        """The entry of metrics/evaluate.json: score and HNS with their CIs, the difference with impala."""
        keys = ("mean_score", "ci_low", "ci_high", "hns", "hns_ci_low", "hns_ci_high", "num_seeds")
        entry = {key: getattr(self, key) for key in keys}
        if self.diff_vs_impala is not None:
            diff = self.diff_vs_impala
            entry["diff_vs_impala"] = {"mean": diff.mean, "ci_low": diff.ci_low, "ci_high": diff.ci_high}
        return entry


@dataclass(frozen=True)
class AtariEvaluation:
    """The no-op-start evaluation of every agent: per game and variant, the median HNS per variant."""

    games: dict[str, dict[str, VariantSummary]]  # game -> variant (impala first) -> summary
    reference_scores: dict[str, dict]  # game -> its random and human scores
    hns: dict[str, dict[str, float]]  # variant -> median and mean HNS over games, number of games
    paper_median_hns_percent: dict[str, float]
    confidence: float

    def to_dict(self) -> dict:
        """The JSON layout of ``score --out`` and of the report's input."""
        return {
            "games": {
                game: {variant: summary.to_dict() for variant, summary in variants.items()}
                for game, variants in self.games.items()
            },
            "reference_scores": self.reference_scores,
            "hns": self.hns,
            "paper_median_hns_percent": self.paper_median_hns_percent,
            "confidence": self.confidence,
        }

    def per_seed_scores(self, game: str, training: dict | None = None) -> dict:
        """``{variant: {seed: {mean, ci_low, ci_high, episodes, frames}}}`` of one game: the shape of
        ``docs/results/pong_seeds.json`` (the evaluate stage's ``reports/seeds_<game>.json``). With
        ``training`` (``{variant: {seed: milestones}}``, ``milestones.cell_milestones``), each agent's
        entry also holds its cell's under ``training``: frames to +10 and +18, when gamma and lambda
        settled, the return per million frames."""
        training = training or {}
        return {
            variant: {
                seed: {
                    "mean": cell.mean_score,
                    "ci_low": cell.ci_low,
                    "ci_high": cell.ci_high,
                    "episodes": len(cell.scores),
                    "frames": cell.train_frames,
                    **({"training": m} if (m := training.get(variant, {}).get(seed)) else {}),
                }
                for seed, cell in summary.seeds.items()
            }
            for variant, summary in self.games[game].items()
        }


def _json_names(data: dict) -> dict:
    """``lambda_`` (a Python keyword otherwise) is "lambda" in the JSON; the key order is kept."""
    return {("lambda" if key == "lambda_" else key): value for key, value in data.items()}


def load_agent(path: Path) -> tuple[AtariActorCritic, torch.Tensor, dict]:
    checkpoint = torch_load(path)
    net = AtariActorCritic(
        checkpoint["num_actions"], checkpoint["network"], checkpoint["stack"], checkpoint["embedding_dim"]
    )
    net.load_state_dict(checkpoint["state_dict"])
    net.eval()
    return net, torch.tensor(checkpoint["eta"], dtype=torch.float32), checkpoint


def sample_actions(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Actions ``[B]`` drawn from ``softmax(logits / temperature)``: 1 is the policy itself (the
    protocol); a small temperature approaches its most likely action, a diagnostic of how much the
    policy's own randomness costs, never the reported score."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (1 samples the policy itself), got {temperature}")
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def play_episodes(
    net: AtariActorCritic,
    eta: torch.Tensor,
    game: str,
    config: AtariEvalConfig,
    env_config: AtariEnvConfig,
    seed: int,
    temperature: float = 1.0,
) -> dict:
    """Play ``config.episodes`` no-op-start episodes in parallel, the first game of each env, with
    actions sampled from the policy (``temperature``: see ``sample_actions``).

    Returns per episode the raw score, the frame at which the policy first acted (1 + the no-op
    frames ALE drew from the env's seed ``seed + i``) and the length in frames after the no-ops.
    """
    episodes = config.episodes
    env = make_vector_env(
        game, episodes, env_config, noop_max=config.noop_max, max_episode_frames=config.max_episode_frames
    )
    generator = torch.Generator().manual_seed(seed)
    scores = np.full(episodes, np.nan)
    lengths = np.zeros(episodes, dtype=np.int64)
    returns = np.zeros(episodes)
    frames = np.zeros(episodes, dtype=np.int64)
    progress = tqdm(total=episodes, desc=f"{game} no-op episodes", unit="episode", disable=None)
    last_log = time.monotonic()
    try:
        obs, info = env.reset(seed=seed + np.arange(episodes))
        start_frames = info["episode_frame_number"].astype(np.int64)
        while np.isnan(scores).any():
            logits, _ = net(torch.from_numpy(obs), eta)
            actions = sample_actions(logits, temperature, generator)
            obs, reward, terminated, truncated, _ = env.step(actions.numpy())
            returns += reward
            frames += env_config.frameskip
            ended = np.logical_or(terminated, truncated)
            first = ended & np.isnan(scores)  # later games of an env (auto-reset) are not scored
            scores[first] = returns[first]
            lengths[first] = frames[first]
            returns[ended] = 0.0
            frames[ended] = 0
            progress.update(int(first.sum()))
            if time.monotonic() - last_log >= PROGRESS_LOG_SECONDS:
                last_log = time.monotonic()
                log.info(
                    "%s: %d/%d episodes ended, the longest running at %d frames",
                    game,
                    int(np.isfinite(scores).sum()),  # not progress.n: a disabled bar does not count
                    episodes,
                    frames.max(),
                )
    finally:
        progress.close()
        env.close()
    return {"scores": scores.tolist(), "start_frames": start_frames.tolist(), "lengths": lengths.tolist()}


def evaluate_agents(
    model_paths: dict[str, dict[str, dict[int, Path]]],
    scores_table: dict,
    config: AtariEvalConfig,
    seed: int,
    confidence: float,
    temperature: float = 1.0,
) -> AtariEvaluation:
    """``model_paths[game][variant][training seed]`` -> scores per cell, per (game, variant) over seeds,
    paired differences with the baseline, and the median HNS over games per variant.

    Every agent plays the same seeded episodes (``seed``): variants and training seeds are compared on
    common random numbers. Per (game, variant): mean raw score and HNS over training seeds with
    Student-t CIs over seeds; per variant other than ``impala``: the paired difference variant − impala
    of the per-seed mean scores, over the seeds both have.
    """
    per_game: dict[str, dict[str, VariantSummary]] = {}
    hns_by_variant: dict[str, dict[str, float]] = {}
    for game, variants in model_paths.items():
        if game not in scores_table["games"]:
            raise ValueError(f"no random/human scores for {game!r} in the Atari-57 table")
        reference = scores_table["games"][game]
        per_game[game] = {}
        for variant, seeds in variants.items():
            cells = {
                train_seed: score_agent(path, game, config, seed, confidence, reference, temperature)
                for train_seed, path in seeds.items()
            }
            per_game[game][variant] = summarize_seeds(cells, confidence)
            hns_by_variant.setdefault(variant, {})[game] = per_game[game][variant].hns
        baseline = per_game[game].get("impala")
        for variant, summary in per_game[game].items():
            if baseline is not None and variant != "impala":
                diff = paired_difference(summary.seeds, baseline.seeds, confidence)
                per_game[game][variant] = replace(summary, diff_vs_impala=diff)
    return AtariEvaluation(
        games=per_game,
        reference_scores={game: scores_table["games"][game] for game in per_game},
        hns={variant: aggregate_hns(values) for variant, values in hns_by_variant.items()},
        paper_median_hns_percent=dict(PAPER_MEDIAN_HNS),
        confidence=confidence,
    )


def score_agent(
    path: Path,
    game: str,
    config: AtariEvalConfig,
    seed: int,
    confidence: float,
    reference: dict,
    temperature: float = 1.0,
) -> AgentScore:
    """One cell's agent: its no-op-start episodes, mean raw score with a CI over episodes, HNS."""
    net, eta, checkpoint = load_agent(path)
    env_config = AtariEnvConfig(**checkpoint["metagrad_config"]["env"])  # as the agent was trained
    log.info("%s: %d no-op episodes", path, config.episodes)
    played = play_episodes(net, eta, game, config, env_config, seed, temperature)
    interval = mean_ci(played["scores"], confidence)
    return AgentScore(
        mean_score=interval.mean,
        ci_low=interval.low,
        ci_high=interval.high,
        hns=human_normalized(interval.mean, reference["random"], reference["human"]),
        train_frames=checkpoint["frames"],
        gamma=float(eta[0]),
        lambda_=float(eta[1]),
        **played,
    )


def summarize_seeds(cells: dict[int, AgentScore], confidence: float) -> VariantSummary:
    """Mean raw score and HNS over training seeds, each with its CI over seeds; the cells under ``seeds``."""
    ordered = dict(sorted(cells.items()))
    score = mean_ci([c.mean_score for c in ordered.values()], confidence)
    hns = mean_ci([c.hns for c in ordered.values()], confidence)
    return VariantSummary(
        mean_score=score.mean,
        ci_low=score.low,
        ci_high=score.high,
        hns=hns.mean,
        hns_ci_low=hns.low,
        hns_ci_high=hns.high,
        num_seeds=len(ordered),
        episodes=sum(len(c.scores) for c in ordered.values()),
        train_frames=min(c.train_frames for c in ordered.values()),
        gamma=float(np.mean([c.gamma for c in ordered.values()])),
        lambda_=float(np.mean([c.lambda_ for c in ordered.values()])),
        seeds={str(k): c for k, c in ordered.items()},
    )


def paired_difference(
    cells: dict[str, AgentScore], baseline: dict[str, AgentScore], confidence: float
) -> PairedDifference:
    """Mean over shared training seeds of (cell score − baseline score), with its Student-t CI."""
    shared = [k for k in cells if k in baseline]
    diffs = {k: cells[k].mean_score - baseline[k].mean_score for k in shared}
    interval = mean_ci(diffs.values(), confidence)
    return PairedDifference(
        mean=interval.mean, ci_low=interval.low, ci_high=interval.high, seeds=len(shared), per_seed=diffs
    )
