"""The no-op-start evaluation protocol of ``pipeline/evaluation/atari_eval.py``."""

import logging

import numpy as np
import pytest
import torch

from pipeline.config import AtariEnvConfig, AtariEvalConfig
from pipeline.evaluation import atari_eval
from pipeline.evaluation.atari_eval import play_episodes, sample_actions
from pipeline.nets.atari import AtariActorCritic

ENV = AtariEnvConfig(env_threads=1)
SHORT = AtariEvalConfig(episodes=12, noop_max=30, max_episode_frames=200)  # games truncated at 200 frames


def random_agent() -> tuple[AtariActorCritic, torch.Tensor]:
    torch.manual_seed(0)
    return AtariActorCritic(6, "nature", 4, 16).eval(), torch.tensor([0.99, 1.0])


def test_no_op_starts_are_seeded_emulator_frames_at_every_frameskip_phase():
    """Each episode starts after k ~ U{0..29} no-op *frames*; whole-step no-ops (4 frames each) would
    give every game the same frameskip phase for its whole length (the bug this protocol fixes)."""
    net, eta = random_agent()
    played = play_episodes(net, eta, "pong", SHORT, ENV, seed=3)
    start = np.array(played["start_frames"])
    assert start.min() >= 1 and start.max() <= SHORT.noop_max  # 1 + the no-op frames
    assert len(set(start % ENV.frameskip)) > 1, "all episodes start at one frameskip phase"
    again = play_episodes(net, eta, "pong", SHORT, ENV, seed=3)
    assert again == played  # the same seed plays the same episodes (common random numbers)
    other = play_episodes(net, eta, "pong", SHORT, ENV, seed=4)
    assert other["start_frames"] != played["start_frames"]


def test_every_env_scores_its_first_game_only():
    net, eta = random_agent()
    played = play_episodes(net, eta, "pong", SHORT, ENV, seed=0)
    assert len(played["scores"]) == SHORT.episodes
    assert all(-21 <= score <= 0 for score in played["scores"])  # a random agent scores no point
    # truncated at max_episode_frames, counted from the policy's first frame: 200 frames = 50 steps
    assert all(length == 200 for length in played["lengths"])


def test_long_evaluations_log_their_progress(monkeypatch, caplog):
    monkeypatch.setattr(atari_eval, "PROGRESS_LOG_SECONDS", 0.0)  # a line after every step
    net, eta = random_agent()
    with caplog.at_level(logging.INFO, logger=atari_eval.__name__):
        play_episodes(net, eta, "pong", SHORT, ENV, seed=0)
    lines = [r.getMessage() for r in caplog.records if "episodes ended" in r.getMessage()]
    assert lines[0] == "pong: 0/12 episodes ended, the longest running at 4 frames"
    assert lines[-1] == "pong: 12/12 episodes ended, the longest running at 0 frames"


def test_actions_sample_the_policy_and_a_small_temperature_plays_its_most_likely_action():
    logits = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))
    sampled = sample_actions(logits, 1.0, torch.Generator().manual_seed(1))
    expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, expected.squeeze(-1))
    assert not torch.equal(sampled, logits.argmax(-1))  # the protocol samples: not the argmax
    sharp = sample_actions(logits, 1e-4, torch.Generator().manual_seed(1))
    assert torch.equal(sharp, logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_actions(logits, 0.0, torch.Generator())
