"""Atari through ale-py's vector env, with the IMPALA/DQN protocol and raw-score bookkeeping.

ale-py's ``AtariVectorEnv`` does the preprocessing in C++ threads: 84x84 grayscale, a 4-frame stack,
action repeat 4 with a max-pool over the last two frames, random no-op starts and the 108 000-frame
episode cap. On top of it ``AtariStepper`` keeps what learning and reporting need apart:

* the learner sees rewards clipped to [-1, 1] and treats a lost life as terminal;
* reported scores are the **raw** (unclipped) returns of whole games (all lives).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..config import AtariEnvConfig, check_game


def make_vector_env(
    game: str,
    num_envs: int,
    env_config: AtariEnvConfig,
    *,
    noop_max: int | None = None,
    max_episode_frames: int | None = None,
):
    """A same-step auto-resetting ALE vector env returning raw rewards and no life-loss resets."""
    from ale_py.vector_env import AtariVectorEnv

    check_game(game)
    env = AtariVectorEnv(
        game,
        num_envs,
        num_threads=env_config.env_threads,
        frameskip=env_config.frameskip,
        stack_num=env_config.stack,
        img_height=84,
        img_width=84,
        grayscale=True,
        maxpool=True,
        noop_max=env_config.noop_max if noop_max is None else noop_max,
        max_num_frames_per_episode=max_episode_frames or env_config.max_episode_frames,
        repeat_action_probability=0.0,
        full_action_space=False,
        episodic_life=False,  # we mark life loss as terminal for learning only, never reset on it
        reward_clipping=False,  # raw rewards; the learner clips its own copy
        autoreset_mode="SameStep",
    )
    return env


class AtariStep(NamedTuple):
    obs: np.ndarray  # [N, stack, 84, 84] uint8; first frame of the next game where a game ended
    reward: np.ndarray  # [N] float32 raw reward
    clipped_reward: np.ndarray  # [N] float32 in [-clip, clip]
    learn_done: np.ndarray  # [N] bool: game over, time limit or lost life (the learner's terminal)
    game_over: np.ndarray  # [N] bool: the game ended (terminated or truncated)
    finished_returns: np.ndarray  # raw returns of the games that ended this step
    finished_lengths: np.ndarray  # their lengths in frames (agent steps x frameskip, after ALE's no-ops)


class AtariStepper:
    """Steps a vector env and keeps per-env raw returns, lives and frame counts."""

    def __init__(
        self,
        game: str,
        num_envs: int,
        env_config: AtariEnvConfig,
        seed: int,
        reward_clip: float = 1.0,
        *,
        noop_max: int | None = None,
        max_episode_frames: int | None = None,
    ):
        self.env = make_vector_env(
            game, num_envs, env_config, noop_max=noop_max, max_episode_frames=max_episode_frames
        )
        self.num_envs = num_envs
        self.num_actions = int(self.env.single_action_space.n)
        self.frameskip = env_config.frameskip
        self.reward_clip = reward_clip
        self.seed = seed
        self._returns = np.zeros(num_envs, dtype=np.float64)
        self._lengths = np.zeros(num_envs, dtype=np.int64)  # frames of the current game seen by the agent
        self._lives = np.zeros(num_envs, dtype=np.int64)
        self.frames = 0  # agent steps x frameskip, summed over envs

    def reset(self) -> np.ndarray:
        obs, info = self.env.reset(seed=self.seed)
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._lives[:] = info["lives"]
        return obs

    def send(self, actions: np.ndarray) -> None:
        """Start stepping (the C++ threads run while Python carries on); finish with ``recv``."""
        self.env.send(np.asarray(actions, dtype=np.int64))

    def recv(self) -> AtariStep:
        obs, reward, terminated, truncated, info = self.env.recv()
        reward = reward.astype(np.float32)
        game_over = np.logical_or(terminated, truncated)
        lives = info["lives"].astype(np.int64)
        life_lost = (lives < self._lives) & ~game_over
        self._lives = lives
        self._returns += reward
        finished_returns = self._returns[game_over].copy()
        self._lengths += self.frameskip
        finished_lengths = self._lengths[game_over].copy()
        self._returns[game_over] = 0.0
        self._lengths[game_over] = 0
        self.frames += self.num_envs * self.frameskip
        return AtariStep(
            obs=obs,
            reward=reward,
            clipped_reward=np.clip(reward, -self.reward_clip, self.reward_clip),
            learn_done=game_over | life_lost,
            game_over=game_over,
            finished_returns=finished_returns,
            finished_lengths=finished_lengths,
        )

    def step(self, actions: np.ndarray) -> AtariStep:
        self.send(actions)
        return self.recv()

    def close(self) -> None:
        self.env.close()


class NoopStarts:
    """The evaluation protocol's no-op starts, done here (not inside ALE) so they are seeded and visible.

    Each new game begins with k ~ U{1, ..., noop_max} NOOP actions (action 0) before the policy acts.
    """

    def __init__(self, num_envs: int, noop_max: int, seed: int):
        if noop_max < 1:
            raise ValueError(f"noop_max must be >= 1, got {noop_max}")
        self.noop_max = noop_max
        self.rng = np.random.default_rng(seed)
        self.remaining = self.draw(num_envs)
        self.history: list[int] = list(self.remaining)

    def draw(self, n: int) -> np.ndarray:
        return self.rng.integers(1, self.noop_max + 1, size=n)

    def apply(self, policy_actions: np.ndarray) -> np.ndarray:
        """Replace the policy's action by NOOP where an env still owes no-ops; count them down."""
        owes = self.remaining > 0
        actions = np.where(owes, 0, policy_actions)
        self.remaining = np.where(owes, self.remaining - 1, 0)
        return actions

    def new_games(self, game_over: np.ndarray) -> None:
        count = int(game_over.sum())
        if count:
            fresh = self.draw(count)
            self.remaining[game_over] = fresh
            self.history.extend(int(k) for k in fresh)
