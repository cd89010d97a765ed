"""Command line: ``python -m pipeline {models,losses,profile,ui,curves,score,collapses,games} ...``.

python -m pipeline models list                      # every registered model
python -m pipeline models list NAME [--tags a,b]    # its versions, aliases and tags
python -m pipeline models show NAME VERSION|ALIAS
python -m pipeline models promote NAME VERSION|ALIAS --alias champion
python -m pipeline models export NAME VERSION|ALIAS PATH [--parents]
python -m pipeline losses list|show|promote|export ...   # the same for tracking.registered_model (epg-loss)
python -m pipeline profile paper        # params.yaml + the params/paper.yaml overlay (validated first)
python -m pipeline ui                   # MLflow UI on the embedded store, 127.0.0.1:5000
python -m pipeline curves checkpoints/metagrad --out DIR   # metagrad curves so far, from checkpoints
python -m pipeline score runs/learn/models/metagrad --episodes 30 --out score.json
                                        # no-op-start scores of trained agents (GAME/VARIANT/seedK.pt)
python -m pipeline collapses RUN_ID      # near-uniform stretches of metagrad cells' policies
python -m pipeline games                # the ALE games this ale-py ships
python -m pipeline params-doc           # regenerate docs/params.md from pipeline/config/

Errors are one line on stderr: exit status 2 for bad input (an unknown version, a missing folder),
69 when the tracking store cannot be reached or written (see ``pipeline.tracking`` for the budgets).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from . import registry, tracking
from .config import ConfigError, ale_games, load_params
from .errors import EXIT_USAGE, StageStop
from .profiles import apply_profile

LOSS_TAG_COLUMNS = ("fitness", "family")
UI_STOP_GRACE_S = 10.0


def default_model_name() -> str:
    try:
        return load_params(tracking.project_root() / "params.yaml").tracking.registered_model
    except ConfigError:
        return "epg-loss"


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------ registry
def cmd_models(args) -> int:
    """``models ACTION NAME ...`` and its alias ``losses ACTION ...`` (NAME from --model or params)."""
    model = args.name or args.model or (default_model_name() if args.command == "losses" else None)
    if model is None:
        return list_models()
    if args.action == "list":
        return list_versions(model, args.tags)
    if args.action == "export":
        target = Path(args.path)
        if not target.is_dir() and not target.parent.is_dir() and not args.parents:
            return _fail(f"folder {target.parent} does not exist (pass --parents to create it)")
    version = str(registry.resolve_version(model, args.version).version)
    if args.action == "show":
        print(json.dumps(next(r for r in registry.list_versions(model) if r["version"] == version), indent=2))
    elif args.action == "promote":
        registry.set_alias(model, version, args.alias)
        print(f"{model} version {version} now has alias {args.alias!r}")
    elif args.action == "export":
        target = registry.export_version(model, version, Path(args.path), parents=args.parents)
        print(f"exported {model} version {version} to {target}")
    return 0


def list_models() -> int:
    names = registry.list_models()
    if not names:
        print(f"no registered models in {tracking.tracking_uri()}")
    for name in names:
        rows = registry.list_versions(name)
        aliases = ", ".join(f"{a}={r['version']}" for r in rows for a in r["aliases"]) or "-"
        print(f"{name}  {len(rows)} versions  {aliases}")
    return 0


def list_versions(model: str, tags: str | None) -> int:
    rows = registry.list_versions(model)
    if not rows:
        print(f"no versions of {model!r} in {tracking.tracking_uri()}")
        return 0
    columns = [t for t in tags.split(",") if t] if tags is not None else short_tag_keys(rows)
    widths = {c: max(10, len(c), *(len(r["tags"].get(c, "-")) for r in rows)) for c in columns}
    tag_header = "".join(f"{c:<{widths[c]}} " for c in columns)
    print(f"{'version':>7}  {'aliases':<22} {tag_header}{'created':<19}  run_id")
    for row in rows:
        created = datetime.fromtimestamp(row["created"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        tag_cells = "".join(f"{row['tags'].get(c, '-'):<{widths[c]}} " for c in columns)
        aliases = ",".join(row["aliases"]) or "-"
        print(f"{row['version']:>7}  {aliases:<22} {tag_cells}{created:<19}  {row['run_id']}")
    return 0


def short_tag_keys(rows: list[dict], longest: int = 16) -> list[str]:
    """The version tags worth a column: every key in first-seen order, but not ids and hashes."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row["tags"]))
    return [k for k in keys if all(len(r["tags"].get(k, "")) <= longest for r in rows)]


def cmd_profile(args) -> int:
    source = tracking.project_root() / "params" / f"{args.name}.yaml"
    if not source.exists():
        names = sorted(p.stem for p in source.parent.glob("*.yaml"))
        return _fail(f"no profile {args.name!r}; available: {', '.join(names)}")
    try:
        apply_profile(args.name, tracking.project_root())
    except ConfigError as err:
        return _fail("\n".join(err.lines))
    print(f"params.yaml now holds the {args.name!r} profile ({source} over the quick defaults)")
    return 0


def cmd_ui(args) -> int:
    """Run ``mlflow ui`` in its own process group and stop the whole group (server and workers) when
    this process is told to stop: SIGTERM, SIGINT (Ctrl-C) or SIGHUP."""
    if port_in_use(args.host, args.port):
        return _fail(f"port {args.port} on {args.host} is already in use; pick another with --port")
    root = tracking.project_root()
    command = [
        *(sys.executable, "-m", "mlflow", "ui"),
        *("--backend-store-uri", tracking.tracking_uri(root)),
        *("--default-artifact-root", tracking.artifact_root(root).as_uri()),
        *("--host", args.host, "--port", str(args.port)),
    ]
    server = subprocess.Popen(command, env={**os.environ}, start_new_session=True)
    stop_requested: list[float] = []

    def forward(signum, frame) -> None:
        stop_requested.append(time.monotonic())
        _signal_group(server.pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    print(f"MLflow UI at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    while server.poll() is None:
        if stop_requested and time.monotonic() - stop_requested[0] > UI_STOP_GRACE_S:
            _signal_group(server.pid, signal.SIGKILL)
        time.sleep(0.1)
    _signal_group(server.pid, signal.SIGKILL)  # workers the server left behind
    if stop_requested or server.returncode == 0:
        return 0
    return _fail(f"mlflow ui stopped with exit status {server.returncode}", code=1)


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (host, port): binding with SO_REUSEADDR, as servers do, fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def cmd_games(args) -> int:
    print("\n".join(ale_games()))
    return 0


def cmd_params_doc(args) -> int:
    from .params_doc import write_params_doc

    print(write_params_doc(tracking.project_root() / "docs" / "params.md"))
    return 0


def cmd_curves(args) -> int:
    from .io import write_json
    from .metagrad.milestones import cell_milestones
    from .metagrad.run import checkpoint_histories, write_curves

    try:
        histories = checkpoint_histories(Path(args.checkpoints))
    except FileNotFoundError as error:
        return _fail(str(error))
    for path in write_curves(histories, Path(args.out)):
        print(path)
    milestones = {}
    for game, variants in histories.items():
        for variant, seeds in variants.items():
            for seed, h in seeds.items():
                m = cell_milestones(h)
                milestones.setdefault(game, {}).setdefault(variant, {})[str(seed)] = m.to_dict()
                print(f"{game}/{variant}/seed{seed}: {describe_cell(h, m)}")
    print(write_json(Path(args.out) / "milestones.json", milestones))
    return 0


def describe_cell(h, m) -> str:
    """One line per cell: frames, games, recent return, when it reached each threshold, gamma and lambda."""
    recent = h.episode_returns[-10:]
    last = f"{sum(recent) / len(recent):.1f}" if recent else "-"
    reached = ", ".join(
        f"+{name} at {frames / 1e6:.0f} M" if frames is not None else f"+{name} not reached"
        for name, frames in m.frames_to_return.items()
    )
    eta = ", ".join(
        f"{name} {final:.4f} (settled at {settled / 1e6:.2f} M)"
        for name, final, settled in (
            ("gamma", m.gamma_final, m.gamma_settled_at),
            ("lambda", m.lambda_final, m.lambda_settled_at),
        )
        if final is not None
    )
    return f"{m.frames} frames, {len(h.episode_returns)} games, last-10 return {last}; {reached}; {eta}"


def cmd_collapses(args) -> int:
    """Near-uniform stretches of each metagrad cell's policy, from the entropy its MLflow run logged."""
    import math

    from .config import AtariEnvConfig
    from .io import write_json
    from .metagrad.milestones import collapse_events, frames_since_collapse
    from .prepare import describe_game

    if args.merge_frames < 0:
        return _fail(f"--merge-frames must be >= 0, got {args.merge_frames}")
    cells, actions, found = {}, {}, []
    mlclient = tracking.client()
    for run_id in args.runs:
        try:
            run = mlclient.get_run(run_id)
        except Exception as error:  # MLflow raises its own exception for an unknown id
            return _fail(f"no MLflow run {run_id} in {tracking.tracking_uri()}: {error}")
        children = mlclient.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
        )
        found += [r for r in [run, *children] if {"game", "variant", "seed"} <= r.data.tags.keys()]
    if not found:
        return _fail(
            f"none of {', '.join(args.runs)} is a metagrad cell run or has one (tags game, variant, seed)"
        )
    for run in found:
        tags = run.data.tags
        history = sorted(mlclient.get_metric_history(run.info.run_id, "entropy"), key=lambda m: m.step)
        frames, entropies = [m.step for m in history], [m.value for m in history]
        if tags["game"] not in actions:
            actions[tags["game"]] = describe_game(tags["game"], AtariEnvConfig())["num_actions"]
        events = collapse_events(
            frames, entropies, math.log(actions[tags["game"]]), args.fraction, args.window, args.merge_frames
        )
        events = [e for e in events if e.start >= args.after]
        since = frames_since_collapse(events, frames)
        starts = ", ".join(f"{e.start / 1e6:.2f}" for e in events) or "none"
        last = "" if since is None else f"; the last ended {since} frames before the final update"
        end = frames[-1] if frames else 0
        print(
            f"{tags['game']}/{tags['variant']}/seed{tags['seed']} (run {run.info.run_id}): {len(events)} "
            f"near-uniform stretches from {args.after / 1e6:g} M frames to the end ({end}), "
            f"starting at (M frames) {starts}{last}"
        )
        cells.setdefault(tags["game"], {}).setdefault(tags["variant"], {})[tags["seed"]] = {
            "run_id": run.info.run_id,
            "updates": len(frames),
            "events": [{"start": e.start, "end": e.end, "peak_entropy": e.peak} for e in events],
            "frames_since_collapse": since,
        }
    if args.out:
        settings = {k: getattr(args, k) for k in ("fraction", "window", "merge_frames", "after")}
        print(write_json(Path(args.out), {"settings": settings, "cells": cells}))
    return 0


def cmd_score(args) -> int:
    from .config import AtariEvalConfig
    from .evaluation.atari_eval import evaluate_agents
    from .evaluation.run import discover_agents
    from .io import write_json
    from .prepare import atari_score_table

    if args.seeds_json and args.temperature != 1.0:
        return _fail("--seeds-json holds the protocol's scores (temperature 1); drop --temperature")
    models = Path(args.models)
    agents = discover_agents(models)
    if not agents:
        return _fail(f"no agents in {models} (expected GAME/VARIANT/seedK.pt files, as in models/metagrad)")
    table = atari_score_table()
    problem = agents_problem(agents, table["games"])
    if problem:
        return _fail(problem)
    config = AtariEvalConfig(episodes=args.episodes)
    results = evaluate_agents(agents, table, config, args.seed, args.confidence, args.temperature)
    for game, variants in results.games.items():
        for variant, row in variants.items():
            for seed, r in row.seeds.items():
                print(
                    f"{game}/{variant}/seed{seed}: mean raw score {r.mean_score:.2f} "
                    f"({args.confidence:.0%} CI {r.ci_low:.2f} to {r.ci_high:.2f}) over "
                    f"{len(r.scores)} no-op-start episodes, human-normalised {100 * r.hns:.1f} %, "
                    f"trained {r.train_frames} frames, gamma {r.gamma:.5f}, lambda {r.lambda_:.5f}"
                )
    if args.out:
        record = {
            **results.to_dict(),
            "models": str(models),
            "seed": args.seed,
            "temperature": args.temperature,
        }
        print(write_json(Path(args.out), record))
    if args.seeds_json:
        if len(results.games) != 1:
            return _fail(f"--seeds-json takes agents of one game; {models} has {', '.join(results.games)}")
        print(write_json(Path(args.seeds_json), results.per_seed_scores(next(iter(results.games)))))
    return 0


def agents_problem(agents: dict[str, dict[str, dict[int, Path]]], scored_games) -> str | None:
    """What is wrong with a GAME/VARIANT/seedK.pt folder before any episode is played, or None."""
    from .evaluation.atari_eval import load_agent

    for game, variants in agents.items():
        paths = [path for seeds in variants.values() for path in seeds.values()]
        folder = paths[0].parent.parent
        if game not in ale_games() or game not in scored_games:
            return (
                f"{folder} is not a game folder: {game!r} is no Atari game with human and random "
                "scores (see python -m pipeline games); move it out of the agents folder"
            )
        for path in paths:
            try:
                load_agent(path)
            except Exception as err:  # any unreadable or foreign .pt file
                return f"{path} is not a trained agent ({type(err).__name__}: {err})"
    return None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def add_registry_actions(parser: argparse.ArgumentParser, named: bool, tags_default: str | None) -> None:
    """list/show/promote/export; ``named``: each takes the registered model's NAME first."""
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="versions with aliases and tags (no NAME: every model)")
    if named:
        listing.add_argument("name", nargs="?", help="registered model (omit to list the models)")
    listing.add_argument(
        "--tags", default=tags_default, help="comma-separated version tags to show as columns"
    )
    show = actions.add_parser("show", help="one version's tags, run and source")
    promote = actions.add_parser("promote", help="point an alias at a version")
    promote.add_argument("--alias", default="champion")
    export = actions.add_parser("export", help="copy a version's file to PATH (a file or a folder)")
    for action in (show, promote, export):
        if named:
            action.add_argument("name", help="registered model, e.g. epg-loss or maml-policy")
        action.add_argument("version", help="version number or alias")
    export.add_argument("path")
    export.add_argument("--parents", action="store_true", help="create missing parent folders of PATH")
    parser.set_defaults(func=cmd_models, name=None, model=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="any registered model in the MLflow Model Registry")
    add_registry_actions(models, named=True, tags_default=None)
    losses = commands.add_parser("losses", help="evolved losses: models ... for tracking.registered_model")
    losses.add_argument("--model", help="registered model name (default: tracking.registered_model)")
    add_registry_actions(losses, named=False, tags_default=",".join(LOSS_TAG_COLUMNS))

    profile = commands.add_parser("profile", help="apply the overlay params/NAME.yaml to params.yaml")
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
    curves.add_argument("--out", required=True, help="folder for the CSVs, PNGs and milestones.json")
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
    score.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="sample from softmax(logits / T): 1 (default) is the protocol; e.g. 0.01 plays nearly the most "
        "likely action, a diagnostic of what the policy's own randomness costs",
    )
    score.add_argument("--out", help="also write the full results (every episode) as JSON here")
    score.add_argument(
        "--seeds-json",
        help="also write {variant: {seed: {mean, ci_low, ci_high, episodes, frames}}} here (one game)",
    )
    score.set_defaults(func=cmd_score)

    collapses = commands.add_parser(
        "collapses", help="stretches where a metagrad cell's policy went back to near uniform (from MLflow)"
    )
    collapses.add_argument(
        "runs", nargs="+", help="MLflow run ids: metagrad cell runs or the stage run above them"
    )
    collapses.add_argument(
        "--fraction", type=probability, default=0.97, help="of the uniform policy's entropy (default 0.97)"
    )
    collapses.add_argument(
        "--window", type=positive_int, default=5, help="updates in the rolling mean (default 5)"
    )
    collapses.add_argument(
        "--merge-frames", type=int, default=20_000, help="stretches this close are one (default 20000)"
    )
    collapses.add_argument(
        "--after", type=int, default=0, help="count stretches that start at this frame or later (default 0)"
    )
    collapses.add_argument("--out", help="also write the stretches of every cell as JSON here")
    collapses.set_defaults(func=cmd_collapses)

    games = commands.add_parser("games", help="list the ALE games")
    games.set_defaults(func=cmd_games)

    params_doc = commands.add_parser("params-doc", help="write docs/params.md from the config's docstrings")
    params_doc.set_defaults(func=cmd_params_doc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StageStop as err:  # an unreachable store, an unknown version: one line, no traceback
        return _fail(str(err), code=err.exit_code)
