"""Exceptions that stop a stage cleanly: a one-line message and a non-zero exit, no traceback.

A training loop that catches ``StageStop`` saves its checkpoint and re-raises; ``stage_main`` prints
``<stage>: <message>`` and exits with ``exit_code``. Subclasses name the cause.
"""

from __future__ import annotations

# sysexits.h: EX_USAGE for bad input, EX_UNAVAILABLE for a service (tracking store, Ray) that is not there.
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69


class StageStop(Exception):
    """Stop the stage: the message is one line for the user; the work so far stays in checkpoints."""

    exit_code = 1


class TrackingUnavailable(StageStop):
    """The MLflow tracking/registry store could not be reached or written within the retry budget."""

    exit_code = EXIT_UNAVAILABLE


class ServiceUnavailable(StageStop):
    """An outside service the stage needs (a Ray cluster) does not answer."""

    exit_code = EXIT_UNAVAILABLE


class BadReference(StageStop):
    """A param names something that does not exist (a registry URI without such a model/version)."""

    exit_code = EXIT_USAGE
