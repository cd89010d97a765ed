"""Command line: ``python -m pipeline {losses,profile,ui,curves,score,games} ...``.

python -m pipeline losses list
python -m pipeline losses show VERSION|ALIAS
python -m pipeline losses promote VERSION --alias champion
python -m pipeline losses export VERSION|ALIAS PATH
python -m pipeline profile paper        # copy params/paper.yaml over params.yaml (validated first)
python -m pipeline ui                   # MLflow UI on the embedded store, 127.0.0.1:5000
python -m pipeline curves checkpoints/metagrad --out DIR   # metagrad curves so far, from checkpoints
python -m pipeline score runs/learn/models/metagrad --episodes 30 --out score.json
                                        # no-op-start scores of trained agents (GAME/VARIANT/seedK.pt)
python -m pipeline games                # the ALE games this ale-py ships
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from . import tracking
from .config import ConfigError, ale_games, load_params

EXIT_USAGE = 2


def default_model_name() -> str:
    try:
        return load_params(tracking.project_root() / "params.yaml").tracking.registered_model
    except ConfigError:
        return "epg-loss"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_losses(args) -> int:
    model = args.model or default_model_name()
    if args.action == "list":
        rows = tracking.list_versions(model)
        if not rows:
            print(f"no versions of {model!r} in {tracking.tracking_uri()}")
            return 0
        print(f"{'version':>7}  {'aliases':<22} {'fitness':>10} {'family':<16} {'created':<19}  run_id")
        for row in rows:
            created = datetime.fromtimestamp(row["created"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(
                f"{row['version']:>7}  {','.join(row['aliases']) or '-':<22} "
                f"{row['tags'].get('fitness', '-'):>10} "
                f"{row['tags'].get('family', '-'):<16} {created:<19}  {row['run_id']}"
            )
        return 0
    try:
        version = tracking.resolve_version(model, args.version)
    except Exception as err:  # MLflow raises its own exception types for unknown versions/aliases
        return _fail(f"{model!r} has no version or alias {args.version!r} ({type(err).__name__})")
    if args.action == "show":
        row = next(r for r in tracking.list_versions(model) if r["version"] == str(version.version))
        print(json.dumps(row, indent=2))
        return 0
    if args.action == "promote":
        tracking.set_alias(model, version.version, args.alias)
        print(f"{model} version {version.version} now has alias {args.alias!r}")
        return 0
    if args.action == "export":
        target = tracking.export_version(model, str(version.version), Path(args.path))
        print(f"exported {model} version {version.version} to {target}")
        return 0
    return _fail(f"unknown action {args.action!r}")


def cmd_profile(args) -> int:
    source = tracking.project_root() / "params" / f"{args.name}.yaml"
    if not source.exists():
        names = sorted(p.stem for p in source.parent.glob("*.yaml"))
        return _fail(f"no profile {args.name!r}; available: {', '.join(names)}")
    try:
        load_params(source)
    except ConfigError as err:
        return _fail("\n".join(err.lines))
    shutil.copyfile(source, tracking.project_root() / "params.yaml")
    print(f"params.yaml now holds the {args.name!r} profile ({source})")
    return 0


def cmd_ui(args) -> int:
    root = tracking.project_root()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking.tracking_uri(root),
        "--default-artifact-root",
        tracking.artifact_root(root).as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI at http://{args.host}:{args.port} (Ctrl-C stops it)")
    return subprocess.call(command, env={**os.environ})


def cmd_games(args) -> int:
    print("\n".join(ale_games()))
    return 0


def cmd_curves(args) -> int:
    from .metagrad.run import checkpoint_histories, write_curves

    try:
        histories = checkpoint_histories(Path(args.checkpoints))
    except FileNotFoundError as error:
        return _fail(str(error))
    for path in write_curves(histories, Path(args.out)):
        print(path)
    for game, variants in histories.items():
        for variant, seeds in variants.items():
            for seed, h in seeds.items():
                recent = h.episode_returns[-10:]
                last = f"{sum(recent) / len(recent):.1f}" if recent else "-"
                frames = h.update_frames[-1] if h.update_frames else 0
                print(
                    f"{game}/{variant}/seed{seed}: {frames} frames, {len(h.episode_returns)} games, "
                    f"last-10 return {last}, "
                    f"gamma {h.gammas[-1] if h.gammas else float('nan'):.4f}, "
                    f"lambda {h.lambdas[-1] if h.lambdas else float('nan'):.4f}"
                )
    return 0


def cmd_score(args) -> int:
    from .config import AtariEvalConfig
    from .evaluation.atari_eval import evaluate_agents
    from .evaluation.run import discover_agents
    from .io import write_json
    from .prepare import atari_score_table

    models = Path(args.models)
    agents = discover_agents(models)
    if not agents:
        return _fail(f"no agents in {models} (expected GAME/VARIANT/seedK.pt files, as in models/metagrad)")
    config = AtariEvalConfig(episodes=args.episodes)
    results = evaluate_agents(agents, atari_score_table(), config, args.seed, args.confidence)
    for game, variants in results["games"].items():
        for variant, row in variants.items():
            for seed, r in row["seeds"].items():
                print(
                    f"{game}/{variant}/seed{seed}: mean raw score {r['mean_score']:.2f} "
                    f"({args.confidence:.0%} CI {r['ci_low']:.2f} to {r['ci_high']:.2f}) over "
                    f"{len(r['scores'])} no-op-start episodes, human-normalised {100 * r['hns']:.1f} %, "
                    f"trained {r['train_frames']} frames, gamma {r['gamma']:.5f}, lambda {r['lambda']:.5f}"
                )
    if args.out:
        print(write_json(Path(args.out), {**results, "models": str(models), "seed": args.seed}))
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    losses = commands.add_parser("losses", help="evolved losses in the MLflow Model Registry")
    losses.add_argument("--model", help="registered model name (default: tracking.registered_model)")
    actions = losses.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="all versions with aliases and fitness")
    show = actions.add_parser("show", help="one version's tags, run and source")
    show.add_argument("version", help="version number or alias")
    promote = actions.add_parser("promote", help="point an alias at a version")
    promote.add_argument("version", help="version number or alias")
    promote.add_argument("--alias", default="champion")
    export = actions.add_parser("export", help="copy a version's loss.pt to PATH")
    export.add_argument("version", help="version number or alias")
    export.add_argument("path")
    losses.set_defaults(func=cmd_losses)

    profile = commands.add_parser("profile", help="switch params.yaml to params/NAME.yaml")
    profile.add_argument("name")
    profile.set_defaults(func=cmd_profile)

    ui = commands.add_parser("ui", help="MLflow UI on the project's embedded store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    curves = commands.add_parser(
        "curves", help="return and gamma/lambda curves from metagrad checkpoints (also of a running stage)"
    )
    curves.add_argument("checkpoints", help="a metagrad checkpoint folder, e.g. checkpoints/metagrad")
    curves.add_argument("--out", required=True, help="folder for the CSVs and PNGs")
    curves.set_defaults(func=cmd_curves)

    score = commands.add_parser(
        "score", help="no-op-start Atari scores (raw and human-normalised) of trained metagrad agents"
    )
    score.add_argument(
        "models", help="a folder of GAME/VARIANT/seedK.pt agents, e.g. runs/learn/models/metagrad"
    )
    score.add_argument("--episodes", type=positive_int, default=30, help="episodes per agent (default 30)")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--confidence", type=probability, default=0.95, help="of the intervals (default 0.95)")
    score.add_argument("--out", help="also write the full results (every episode) as JSON here")
    score.set_defaults(func=cmd_score)

    games = commands.add_parser("games", help="list the ALE games")
    games.set_defaults(func=cmd_games)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
