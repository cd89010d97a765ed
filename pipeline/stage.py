"""The shared entry point of the stage scripts in ``stages/``.

``stage_main`` parses ``--params``, validates the whole params file before any work (exit status 2,
one line per bad key, nothing written), checks what the stage needs from outside (``preflight``: the
tracking store, registry URIs, Ray), configures logging and threads, and opens the stage's MLflow
run. Stage scripts then only call one library function and name their output paths. A ``StageStop``
(the tracking store gone for too long, a missing service) ends the stage with one line on stderr and
its exit status, the work so far kept in the stage's checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError, PipelineConfig, load_params, params_hash, section_dict
from .errors import StageStop
from .io import read_json, write_json
from .preflight import preflight

log = logging.getLogger("pipeline")

EXIT_BAD_PARAMS = 2


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MLflow and alembic are chatty at INFO about database migrations.
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.system_metrics", "evotorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(stage: str, argv: list[str] | None = None) -> tuple[PipelineConfig, Path]:
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--output-root",
        default=".",
        type=Path,
        help="folder under which data/, models/, metrics/, plots/, reports/ and checkpoints/ are read and "
        "written (default: the project root, as DVC expects; another folder keeps a side run apart)",
    )
    args = parser.parse_args(argv)
    try:
        return load_params(Path(args.params)), args.output_root
    except ConfigError as err:
        print(f"{stage}: invalid params, nothing was run or written:", file=sys.stderr)
        for line in err.lines:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS) from None


def stage_main(
    stage: str, body: Callable[[PipelineConfig, Path], object], argv: list[str] | None = None
) -> None:
    """Validate params and preflight, then run ``body(config, output_root)``; bad params exit 2 before
    any work, a ``StageStop`` exits with its status and one line on stderr."""
    configure_logging()
    config, output_root = parse_args(stage, argv)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    section = section_dict(config, stage)
    log.info("%s: params hash %s", stage, params_hash(section))
    try:
        preflight(section)
        body(config, output_root)
    except StageStop as err:
        print(f"{stage}: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


RUN_STATE_FILE = "run.json"


def resumable_run_id(checkpoint_dir: Path, section_hash: str) -> str | None:
    """The MLflow run id a killed stage left behind, if its params are the ones we run with now."""
    state_file = Path(checkpoint_dir) / RUN_STATE_FILE
    if not state_file.exists():
        return None
    state = read_json(state_file)
    if state.get("params_hash") != section_hash:
        log.info("checkpoints in %s are for other params; starting over", checkpoint_dir)
        return None
    return state.get("mlflow_run_id")


def remember_run(checkpoint_dir: Path, section_hash: str, run_id: str) -> None:
    write_json(Path(checkpoint_dir) / RUN_STATE_FILE, {"params_hash": section_hash, "mlflow_run_id": run_id})


def code_fingerprint() -> str:
    """Hash of the library and stage sources: checkpoints are only resumed by the code that wrote them."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*package.rglob("*.py"), *(package.parent / "stages").glob("*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_key(section_hash: str) -> str:
    """What a checkpoint must match to be resumed: the stage's params and the code."""
    return f"{section_hash}-{code_fingerprint()}"


@contextmanager
def resumable_stage_run(
    stage: str, config: PipelineConfig, checkpoint_dir: Path
) -> Iterator[tuple[object, str]]:
    """The MLflow run of a checkpointing stage: continues the run a killed invocation left behind (same
    params and code), else starts one. Yields (run, resume_key); checkpoints must carry resume_key."""
    from .tracking import StageRun

    section = section_dict(config, stage)
    section_hash = params_hash(section)
    resume_key = checkpoint_key(section_hash)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with StageRun(
        stage,
        section,
        section_hash,
        experiment=config.tracking.experiment,
        resume_run_id=resumable_run_id(checkpoint_dir, resume_key),
        system_metrics=config.tracking.system_metrics,
    ) as run:
        remember_run(checkpoint_dir, resume_key, run.run_id)
        yield run, resume_key
