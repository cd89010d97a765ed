"""Tests for pipeline.envs.atari: the ALE vector-env stepper and the evaluation no-op starts."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import AtariEnvConfig, check_game
from pipeline.envs.atari import AtariStepper, ReplayMismatch

# One C++ worker thread per vector env: the tests are small, and the machine may be busy.
ENV = AtariEnvConfig(env_threads=1)
ENV_NO_NOOPS = AtariEnvConfig(env_threads=1, noop_max=0)


def random_actions(rng: np.random.Generator, stepper: AtariStepper) -> np.ndarray:
    return rng.integers(0, stepper.num_actions, size=stepper.num_envs)


@pytest.fixture
def make_stepper():
    """AtariStepper factory whose environments are closed after the test."""
    steppers: list[AtariStepper] = []

    def make(game: str, num_envs: int, env_config: AtariEnvConfig = ENV, **kwargs) -> AtariStepper:
        stepper = AtariStepper(game, num_envs, env_config, seed=kwargs.pop("seed", 0), **kwargs)
        steppers.append(stepper)
        return stepper

    yield make
    for stepper in steppers:
        stepper.close()


# --------------------------------------------------------------------------------------------- AtariStepper
def test_pong_observations_actions_and_frame_counter(make_stepper):
    stepper = make_stepper("pong", 2)
    assert stepper.num_actions == 6  # pong's minimal action set
    obs = stepper.reset()
    assert obs.dtype == np.uint8
    assert obs.shape == (2, 4, 84, 84)
    assert stepper.frames == 0

    rng = np.random.default_rng(0)
    steps = 25
    for _ in range(steps):
        result = stepper.step(random_actions(rng, stepper))
        assert result.obs.dtype == np.uint8
        assert result.obs.shape == (2, 4, 84, 84)
        for name in ("reward", "clipped_reward", "learn_done", "game_over"):
            assert getattr(result, name).shape == (2,), name
        assert result.reward.dtype == np.float32
        assert result.learn_done.dtype == bool and result.game_over.dtype == bool
    # every agent step is frameskip (4) emulator frames in each of the N envs
    assert stepper.frames == steps * 2 * 4
    # the frames are not blank: the stack holds a real screen
    assert result.obs.max() > result.obs.min()


def test_raw_rewards_are_reported_and_clipped_rewards_are_learned(make_stepper):
    """Space Invaders scores 5..30 per alien: the raw/clipped bookkeeping is visible.

    Games are cut by the frame cap (1000 frames = 250 agent steps), so several end in a short run;
    finished_returns must be the raw sums of exactly the rewards of the game that ended.
    """
    max_frames = 1000
    stepper = make_stepper("space_invaders", 2, ENV_NO_NOOPS, max_episode_frames=max_frames)
    stepper.reset()
    rng = np.random.default_rng(1)
    firing = np.array([1, 4, 5])  # FIRE, RIGHTFIRE, LEFTFIRE: random play that scores
    raw_sums = np.zeros(2)
    clipped_sums = np.zeros(2)
    finished, finished_clipped, largest_reward = [], [], 0.0
    for _ in range(510):
        result = stepper.step(rng.choice(firing, size=2))
        np.testing.assert_array_equal(result.clipped_reward, np.clip(result.reward, -1.0, 1.0))
        largest_reward = max(largest_reward, float(np.abs(result.reward).max()))
        raw_sums += result.reward
        clipped_sums += result.clipped_reward
        over = result.game_over
        # finished games are reported in env order, with their raw return
        np.testing.assert_allclose(result.finished_returns, raw_sums[over])
        assert len(result.finished_lengths) == over.sum()
        assert np.all(result.learn_done[over]), "a finished game is terminal for learning too"
        finished.extend(raw_sums[over])
        finished_clipped.extend(clipped_sums[over])
        if over.any():
            # without ALE no-ops a game cut by the cap lasts exactly max_frames frames
            np.testing.assert_array_equal(result.finished_lengths, max_frames)
        raw_sums[over] = 0.0
        clipped_sums[over] = 0.0

    assert largest_reward > 1.0, "the test needs rewards beyond the clip range"
    assert len(finished) >= 4  # 2 envs x 2 capped games each
    # the reported returns are raw scores, not the clipped ones the learner sees
    assert any(raw > clipped for raw, clipped in zip(finished, finished_clipped, strict=True))
    assert all(raw % 5 == 0 for raw in finished)  # Space Invaders scores are multiples of 5


def test_lost_life_is_terminal_for_learning_but_not_game_over(make_stepper):
    """Breakout has 5 lives: a lost life sets learn_done only; game_over comes with the last life."""
    stepper = make_stepper("breakout", 2)
    stepper.reset()
    np.testing.assert_array_equal(stepper._lives, 5)
    rng = np.random.default_rng(2)
    life_losses = games_over = 0
    for _ in range(500):
        lives_before = stepper._lives.copy()
        result = stepper.step(random_actions(rng, stepper))
        lives_after = stepper._lives
        lost = (lives_after < lives_before) & ~result.game_over
        np.testing.assert_array_equal(result.learn_done, lost | result.game_over)
        # a game never ends before its last life (random play cannot reach the 108 000-frame cap)
        np.testing.assert_array_equal(lives_before[result.game_over], 1)
        # a new game starts with all lives again (same-step auto-reset)
        np.testing.assert_array_equal(lives_after[result.game_over], 5)
        life_losses += int(lost.sum())
        games_over += int(result.game_over.sum())
    assert life_losses >= 4 * games_over and life_losses > 0
    assert games_over >= 1


def test_same_seed_same_frames(make_stepper):
    first = make_stepper("pong", 2, seed=3)
    second = make_stepper("pong", 2, seed=3)
    np.testing.assert_array_equal(first.reset(), second.reset())
    actions = np.array([2, 3])
    for _ in range(5):
        np.testing.assert_array_equal(first.step(actions).obs, second.step(actions).obs)


def play(stepper: AtariStepper, actions: np.ndarray) -> list:
    """Step through ``actions`` [steps, N]; every field of every step, for exact comparison."""
    return [stepper.step(row) for row in actions]


def assert_same_steps(first: list, second: list) -> None:
    assert len(first) == len(second)
    for step, (a, b) in enumerate(zip(first, second, strict=True)):
        for name in a._fields:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{name}, step {step}")


@pytest.mark.parametrize("game", ["breakout", "space_invaders"])
def test_restored_stepper_continues_exactly_as_the_original(make_stepper, game):
    """state() / restore(): a fresh stepper continues bit for bit, across auto-resets and seeded
    resets (short games and a short reseed interval make both happen within a few hundred steps).
    Breakout and Space Invaders are games whose unseeded resets depend on the emulator's history."""
    options = dict(max_episode_frames=240, reseed_after_steps=90, seed=5)
    original = make_stepper(game, 3, **options)
    original.reset()
    rng = np.random.default_rng(0)
    before, after = (rng.integers(0, original.num_actions, size=(n, 3)) for n in (230, 150))
    play(original, before)
    assert original._reseeds.sum() >= 3, "the test needs seeded resets before the snapshot"
    assert (original._segment_start > 0).any() and len(original._log) < 230, "the log is trimmed"
    state = original.state()
    expected = play(original, after)

    restored = make_stepper(game, 3, **options)
    obs = restored.restore(state)
    np.testing.assert_array_equal(obs, state["obs"])
    assert restored.frames == state["frames"]
    assert_same_steps(play(restored, after), expected)
    assert any(len(step.finished_returns) for step in expected), "games end after the restore"


def test_restore_refuses_frames_it_cannot_reproduce(make_stepper):
    original = make_stepper("breakout", 2)
    original.reset()
    play(original, np.random.default_rng(1).integers(0, original.num_actions, size=(60, 2)))
    state = original.state()
    state["actions"] = np.roll(state["actions"], 1, axis=0)  # not the actions that made the frames
    with pytest.raises(ReplayMismatch, match="did not reproduce"):
        make_stepper("breakout", 2).restore(state)


# --------------------------------------------------------------------------------------------- game names
def test_unknown_game_names_close_matches():
    assert check_game("pong") == "pong"
    with pytest.raises(ValueError, match="pong") as info:
        check_game("pongg")
    assert "did you mean" in str(info.value)
    with pytest.raises(ValueError, match="no close match"):
        check_game("zzzzzzzz")


def test_stepper_rejects_unknown_game():
    with pytest.raises(ValueError, match="breakout"):
        AtariStepper("breakoutt", 2, ENV, seed=0)
