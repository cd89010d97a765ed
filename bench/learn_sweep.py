"""Learning-speed sweep: several metagrad settings trained side by side for a fixed wall-clock budget.

    python bench/learn_sweep.py --params params/learn.yaml --minutes 6 --out runs/sweep \
        --config eps1e-2:rmsprop_eps=0.01 --config eps1e-4:rmsprop_eps=0.0001 \
        --config meta:rmsprop_eps=0.0001,variant=gamma_lambda

Each ``--config NAME:key=value,...`` overrides ``metagrad`` keys of the params file (``variant`` picks
the variant, default ``impala``) and trains in its own process, all from the same seed, with the
params file's full frame budget (so learning-rate schedules are those of the real run) until the
time is up. Every run checkpoints often; afterwards the histories are read back from the checkpoints
and a JSON summary is printed: frames reached, frames/s, and the mean raw return of the games that
ended in each window of frames. A run stopped early resumes from its checkpoint when started again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config import METAGRAD_VARIANTS, load_params
from pipeline.io import torch_load, write_json
from pipeline.metagrad.train import History, train_variant
from pipeline.seeding import variant_seed


def parse_config(spec: str) -> tuple[str, dict]:
    name, _, assignments = spec.partition(":")
    if not name or not assignments:
        raise argparse.ArgumentTypeError(f"--config {spec!r}: expected NAME:key=value[,key=value]")
    overrides = {}
    for item in assignments.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--config {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    variant = overrides.pop("variant", "impala")
    if variant not in METAGRAD_VARIANTS:
        raise argparse.ArgumentTypeError(
            f"--config {spec!r}: variant {variant!r}; allowed: {', '.join(METAGRAD_VARIANTS)}"
        )
    return name, {"variant": variant, "overrides": overrides}


def train_one(params: str, overrides: dict, variant: str, threads: int, checkpoint: str) -> None:
    torch.set_num_threads(threads)
    pipeline = load_params(params)
    config = pipeline.metagrad
    env = config.env.model_copy(update={"env_threads": threads})
    config = type(config).model_validate(
        {**config.model_dump(by_alias=True), **overrides, "env": env.model_dump(), "checkpoint_every": 50}
    )
    game = config.games[0]
    train_variant(config, game, variant, variant_seed(pipeline.seed, game), Path(checkpoint))


def windows(history: History, width: int) -> list[dict]:
    frames, returns = np.asarray(history.episode_frames), np.asarray(history.episode_returns)
    rows = []
    for start in range(0, int(frames.max(initial=0)), width):
        chosen = returns[(frames > start) & (frames <= start + width)]
        if len(chosen):
            rows.append(
                {"frames_to": start + width, "games": len(chosen), "mean_return": float(chosen.mean())}
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params/learn.yaml")
    parser.add_argument("--config", action="append", type=parse_config, required=True)
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget of every run")
    parser.add_argument("--threads", type=int, default=2, help="torch and env threads per run")
    parser.add_argument("--window", type=int, default=500_000, help="frames per summary window")
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args()
    configs = dict(args.config)
    game = load_params(args.params).metagrad.games[0]
    out = Path(args.out)
    checkpoints = {name: out / name / f"{game}_{c['variant']}.pt" for name, c in configs.items()}

    context = multiprocessing.get_context("spawn")
    processes = {
        name: context.Process(
            target=train_one,
            args=(args.params, c["overrides"], c["variant"], args.threads, str(checkpoints[name])),
            daemon=True,
        )
        for name, c in configs.items()
    }
    start = time.perf_counter()
    for process in processes.values():
        process.start()
    deadline = start + 60 * args.minutes
    while time.perf_counter() < deadline and any(p.is_alive() for p in processes.values()):
        time.sleep(5)
    for process in processes.values():
        process.terminate()  # the last checkpoint (every 50 updates) is what counts
        process.join()

    summary = {}
    for name, c in configs.items():
        if not checkpoints[name].exists():
            summary[name] = {**c, "error": "no checkpoint written"}
            continue
        state = torch_load(checkpoints[name])
        history = History(**state["history"])
        summary[name] = {
            **c,
            "frames": state["frames"],
            "frames_per_second": round(state["frames"] / max(state["elapsed"], 1e-9)),
            "gamma": history.gammas[-1] if history.gammas else None,
            "lambda": history.lambdas[-1] if history.lambdas else None,
            "last_100_games_mean_return": float(np.mean(history.episode_returns[-100:]))
            if history.episode_returns
            else None,
            "windows": windows(history, args.window),
        }
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
