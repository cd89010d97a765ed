"""Atari through ale-py's vector env, with the IMPALA/DQN protocol and raw-score bookkeeping.

ale-py's ``AtariVectorEnv`` does the preprocessing in C++ threads: 84x84 grayscale, a 4-frame stack,
action repeat 4 with a max-pool over the last two frames, random no-op starts and the 108 000-frame
episode cap. On top of it ``AtariStepper`` keeps what learning and reporting need apart:

* the learner sees rewards clipped to [-1, 1] and treats a lost life as terminal;
* reported scores are the **raw** (unclipped) returns of whole games (all lives);
* ``state()`` / ``restore()`` checkpoint the emulators, so that a resumed run equals an uninterrupted one.

The vector env cannot clone or restore its C++ emulators, but it is deterministic: an env reset with a
seed reloads its ROM, and from there its frames (including the no-op starts of its auto-resets) depend
only on the actions it is sent. So the stepper keeps, per env, the seed of its last seeded reset and the
actions since, and ``restore`` replays them (the env's frame stack, lives and episode come back with
them; the replayed frames are checked against the saved ones). To bound the replay, an env whose log
has grown past ``reseed_after_steps`` is reset with a fresh seed at its next game over instead of
ALE's unseeded auto-reset. A seeded reset reloads the ROM (0.09-0.11 s for one env of a 4-env Pong
vector env on a 2-core machine; the other envs wait), so it is rare: once per ``reseed_after_steps``
agent steps of an env. Logging the actions costs about 11 us per vector step.
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


RESEED_AFTER_STEPS = 100_000  # agent steps of one env between seeded resets: the longest replay + 1 game


class ReplayMismatch(RuntimeError):
    """Replaying the saved actions did not reproduce the saved frames (e.g. another ale-py version)."""


def reseed(seed: int, env: int, count: int) -> int:
    """The seed of the ``count``-th seeded reset of env ``env`` (ALE takes non-negative int32 seeds)."""
    return int(np.random.SeedSequence([seed, env, count]).generate_state(1)[0] % 2**31)


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
        reseed_after_steps: int = RESEED_AFTER_STEPS,
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
        # The replay log (see the module docstring): vector steps so far, the actions of every step
        # since the oldest segment began, and per env its segment's first step, seed and reseed count.
        self.reseed_after_steps = reseed_after_steps
        self._step = 0
        self._log: list[np.ndarray] = []
        self._log_start = 0
        self._segment_start = np.zeros(num_envs, dtype=np.int64)
        self._segment_seed = np.zeros(num_envs, dtype=np.int64)
        self._reseeds = np.zeros(num_envs, dtype=np.int64)
        self._sent: np.ndarray | None = None
        self._obs: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        seeds = self.seed + np.arange(self.num_envs)  # what env.reset(seed=self.seed) gives
        obs, info = self.env.reset(seed=seeds)
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._lives[:] = info["lives"]
        self._step = self._log_start = 0
        self._log.clear()
        self._segment_start[:] = 0
        self._segment_seed[:] = seeds
        self._reseeds[:] = 0
        self._obs = obs
        return obs

    def send(self, actions: np.ndarray) -> None:
        """Start stepping (the C++ threads run while Python carries on); finish with ``recv``."""
        actions = np.asarray(actions, dtype=np.int64)
        self._sent = actions.astype(np.uint8)  # a copy for the replay log (<= 18 actions)
        self.env.send(actions)

    def recv(self) -> AtariStep:
        obs, reward, terminated, truncated, info = self.env.recv()
        self._log.append(self._sent)
        self._step += 1
        reward = reward.astype(np.float32)
        game_over = np.logical_or(terminated, truncated)
        lives = info["lives"].astype(np.int64)
        life_lost = (lives < self._lives) & ~game_over
        long_segments = game_over & (self._step - self._segment_start >= self.reseed_after_steps)
        if long_segments.any():
            obs, lives = self._reseed(long_segments, obs, lives)
        self._lives = lives
        self._obs = obs
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

    def _reseed(self, envs: np.ndarray, obs: np.ndarray, lives: np.ndarray):
        """Replace the auto-reset of the games that just ended in ``envs`` by a seeded reset."""
        index = np.flatnonzero(envs)
        self._reseeds[index] += 1
        seeds = np.array([reseed(self.seed, i, n) for i, n in zip(index, self._reseeds[index], strict=True)])
        fresh, info = self.env.reset(seed=seeds, options={"reset_mask": envs})
        obs, lives = obs.copy(), lives.copy()
        obs[envs], lives[envs] = fresh[envs], info["lives"][envs]
        self._segment_start[index] = self._step
        self._segment_seed[index] = seeds
        oldest = int(self._segment_start.min())  # actions before every segment's start are not needed
        del self._log[: oldest - self._log_start]
        self._log_start = oldest
        return obs, lives

    def state(self) -> dict:
        """Everything ``restore`` needs to bring a fresh stepper of the same game and config here."""
        actions = np.stack(self._log) if self._log else np.zeros((0, self.num_envs), dtype=np.uint8)
        return {
            "seed": self.seed,
            "step": self._step,
            "actions": actions,  # [steps since the oldest segment began, N]
            "segment_start": self._segment_start - self._log_start,  # per env: row of its seeded reset
            "segment_seed": self._segment_seed.copy(),
            "reseeds": self._reseeds.copy(),
            "returns": self._returns.copy(),
            "lengths": self._lengths.copy(),
            "lives": self._lives.copy(),
            "frames": self.frames,
            "obs": self._obs,  # the replay must end on these frames
        }

    def restore(self, state: dict) -> np.ndarray:
        """Replay ``state`` (from ``state()``) into the envs; returns the current observations.

        Env i is reset with its segment's seed at the row its segment began (the others keep
        stepping meanwhile; what they do before their own reset does not matter), then every env
        takes its logged actions, so all envs end at the saved step together.
        """
        if state["seed"] != self.seed:
            raise ValueError(f"env state is for seed {state['seed']}, this stepper has seed {self.seed}")
        actions, starts, seeds = state["actions"], state["segment_start"], state["segment_seed"]
        obs, info = self.env.reset(seed=seeds)
        for row in range(len(actions) + 1):
            starting = starts == row
            if row > 0 and starting.any():
                obs, info = self.env.reset(seed=seeds[starting], options={"reset_mask": starting})
            if row < len(actions):
                obs, *_, info = self.env.step(actions[row].astype(np.int64))
        if not (np.array_equal(obs, state["obs"]) and np.array_equal(info["lives"], state["lives"])):
            raise ReplayMismatch(
                f"replaying {len(actions)} logged steps did not reproduce the saved frames of the "
                f"emulators (another ale-py version?)"
            )
        self._step = state["step"]
        self._log = list(actions)
        self._log_start = self._step - len(actions)
        self._segment_start = starts + self._log_start
        self._segment_seed, self._reseeds = seeds.copy(), state["reseeds"].copy()
        self._returns, self._lengths = state["returns"].copy(), state["lengths"].copy()
        self._lives, self.frames, self._obs = state["lives"].copy(), state["frames"], obs
        return obs

    def close(self) -> None:
        self.env.close()
