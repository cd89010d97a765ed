"""The prepare stage: check environments and ROMs, write env metadata, task splits and score table."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import logging
from importlib import resources
from pathlib import Path

import torch

from .config import PipelineConfig, PrepareConfig, params_hash, section_dict
from .envs import tasks as task_envs
from .io import write_json
from .tracking import StageRun

log = logging.getLogger(__name__)

TASKS_FORMAT_VERSION = 1
SCORE_TABLE = "atari57_scores.csv"


def atari_score_table() -> dict:
    """Random-agent and human scores for the 57 Atari games (DQN-era no-op table), from the package."""
    text = resources.files("pipeline.data").joinpath(SCORE_TABLE).read_text()
    games = {
        row["game"]: {"random": float(row["random"]), "human": float(row["human"])}
        for row in csv.DictReader(text.splitlines())
    }
    return {
        "source": "Atari-57 random/human scores used for human-normalised scores (Mnih et al. 2015; "
        "van Hasselt et al. 2016; IMPALA; meta-gradient RL). No-op starts, 108k-frame episodes.",
        "formula": "hns = (agent - random) / (human - random)",
        "games": games,
    }


def describe_game(game: str, env_config) -> dict:
    """Load the ROM through ale-py's bundled ROMs and record what the learner will see."""
    from ale_py import roms

    from .envs.atari import make_vector_env

    rom_path = roms.get_rom_path(game)
    md5 = hashlib.md5(Path(rom_path).read_bytes()).hexdigest()
    env = make_vector_env(game, num_envs=1, env_config=env_config)
    try:
        observations, _ = env.reset(seed=0)
        num_actions = int(env.single_action_space.n)
    finally:
        env.close()
    return {
        "game": game,
        "rom_md5": md5,
        "num_actions": num_actions,
        "observation_shape": list(observations.shape[1:]),
        "observation_dtype": str(observations.dtype),
    }


def describe_family(family: str, seed: int) -> dict:
    """Instantiate a task family on a few tasks and step it once, as a smoke check."""
    tasks = task_envs.sample_tasks(family, "train", 4, seed)
    env = task_envs.make_env(family, tasks)
    generator = torch.Generator().manual_seed(seed)
    obs = env.reset(torch.rand(env.num_envs, env.noise_dim, generator=generator))
    if env.discrete:
        actions = torch.zeros(env.num_envs, dtype=torch.long)
    else:
        actions = torch.zeros(env.num_envs, env.action_dim)
    result = env.step(actions, torch.rand(env.num_envs, env.noise_dim, generator=generator))
    if not (torch.isfinite(obs).all() and torch.isfinite(result.obs).all()):
        raise RuntimeError(f"task family {family} produced non-finite observations")
    return {
        "family": family,
        "obs_dim": env.obs_dim,
        "discrete": env.discrete,
        "action_dim": env.action_dim,
        "max_episode_steps": env.max_episode_steps,
        "param_ranges": task_envs.task_param_ranges(family),
    }


def task_splits(config: PrepareConfig, seed: int) -> dict:
    """Train pool, held-out test tasks (same distribution) and out-of-distribution tasks per family."""
    sizes = {split: getattr(config, f"num_{split}_tasks") for split in task_envs.SPLITS}
    families = {}
    for family in config.task_families:
        families[family] = {
            "param_ranges": task_envs.task_param_ranges(family),
            **{split: task_envs.sample_tasks(family, split, n, seed) for split, n in sizes.items()},
        }
    return {"format_version": TASKS_FORMAT_VERSION, "seed": seed, "families": families}


def versions() -> dict:
    names = ["ale-py", "gymnasium", "mujoco", "torch", "evotorch", "mlflow", "dvc", "numpy"]
    return {name: importlib.metadata.version(name) for name in names}


def run_prepare(config: PipelineConfig, out_dir: Path, metrics_path: Path) -> dict:
    section = section_dict(config, "prepare")
    with StageRun("prepare", section, params_hash(section), experiment=config.tracking.experiment) as run:
        games = {}
        for game in config.prepare.games:
            log.info("checking ROM and preprocessing for %s", game)
            games[game] = describe_game(game, config.metagrad.env)
        families = {family: describe_family(family, config.seed) for family in config.prepare.task_families}
        env_metadata = {"versions": versions(), "atari": games, "task_families": families}
        scores = atari_score_table()
        tasks = task_splits(config.prepare, config.seed)

        paths = {
            "envs": write_json(out_dir / "envs.json", env_metadata),
            "atari_scores": write_json(out_dir / "atari_scores.json", scores),
            "tasks": write_json(out_dir / "tasks.json", tasks),
        }
        for path in paths.values():
            run.log_artifact(path, artifact_path="prepared")
        metrics = {
            "num_games": len(games),
            "num_score_games": len(scores["games"]),
            "num_tasks": {
                family: {
                    split: len(split_tasks) for split, split_tasks in data.items() if split != "param_ranges"
                }
                for family, data in tasks["families"].items()
            },
            "mlflow_run_id": run.run_id,
        }
        run.log_metrics({"num_games": metrics["num_games"], "num_score_games": metrics["num_score_games"]})
        write_json(metrics_path, metrics)
        log.info("prepared %d games, %d task families -> %s", len(games), len(families), out_dir)
        return metrics
