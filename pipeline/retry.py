"""Outages of the tracking store: recognising them, retrying through them, the one-line error.

``call`` runs one MLflow operation and retries it with exponential backoff while the store is
transiently unavailable (a SQLite file locked by another writer, a server that refuses or times out),
within a budget in seconds; then, or at once for a store that cannot be written at all, it raises
``TrackingUnavailable`` naming the store and the cause. Other errors pass through untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator

from .errors import TrackingUnavailable

log = logging.getLogger(__name__)

CONNECT_ENV, CONNECT_DEFAULT_S = "PIPELINE_TRACKING_CONNECT_S", 15.0
OUTAGE_ENV, OUTAGE_DEFAULT_S = "PIPELINE_TRACKING_OUTAGE_S", 600.0
SQLITE_BUSY_ENV, SQLITE_BUSY_DEFAULT_S = "PIPELINE_SQLITE_BUSY_S", 5.0
FIRST_RETRY_DELAY_S, MAX_RETRY_DELAY_S = 0.25, 30.0


def seconds(env: str, default: float) -> float:
    text = os.environ.get(env, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise TrackingUnavailable(f"{env}={text!r} is not a number of seconds") from None
    return max(0.0, value)


def sqlite_busy_s() -> float:
    return seconds(SQLITE_BUSY_ENV, SQLITE_BUSY_DEFAULT_S)


def connect_budget_s() -> float:
    return seconds(CONNECT_ENV, CONNECT_DEFAULT_S)


def outage_budget_s() -> float:
    return seconds(OUTAGE_ENV, OUTAGE_DEFAULT_S)


_TRANSIENT_TEXT = ("database is locked", "database is busy", "database table is locked")
_FATAL_TEXT = ("readonly database", "unable to open database file", "disk i/o error", "database disk image")


def diagnose(err: BaseException) -> tuple[bool, str] | None:
    """(transient, one-line cause) when ``err`` says the store is unavailable, else None.

    Transient: a lock held by another writer, a refused or timed-out connection, a server that asks to
    come back later. Not transient: a store that cannot be written or opened at all.
    """
    for link in _chain(err):
        text = str(link).strip().splitlines()[0] if str(link).strip() else type(link).__name__
        fatal = [line for line in str(link).splitlines() if any(m in line.lower() for m in _FATAL_TEXT)]
        if fatal:
            return False, _short(fatal[0])
        if any(marker in str(link).lower() for marker in _TRANSIENT_TEXT):
            return True, "database is locked by another process"
        if isinstance(link, ConnectionRefusedError):
            return True, "connection refused"
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True, _short(text)
        if getattr(link, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True, _short(text)
    for link in _chain(err):  # requests/urllib3 errors whose cause was not chained
        name, module = type(link).__name__, type(link).__module__
        if module.split(".")[0] in ("requests", "urllib3") and ("Connection" in name or "Timeout" in name):
            return True, name
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _short(text: str, limit: int = 160) -> str:
    """One line; without SQLAlchemy's "(sqlite3.OperationalError) " prefix."""
    text = re.sub(r"^\([\w.]+\)\s*", "", re.sub(r"\s+", " ", text).strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unavailable(
    cause: str, *, transient: bool, waited_s: float | None = None, detail: str = ""
) -> TrackingUnavailable:
    """The one-line error naming the store, what went wrong and what to do."""
    from .tracking import tracking_uri

    store = tracking_uri()
    if not transient:
        message = (
            f"MLflow tracking store {store} cannot be used: {cause}; make it (and its folder) writable "
            "or point MLFLOW_TRACKING_URI elsewhere"
        )
    else:
        message = (
            f"MLflow tracking store {store} unavailable ({cause})"
            + (f" for {waited_s:.0f} s" if waited_s is not None else "")
            + "; start the server or release the lock, or point MLFLOW_TRACKING_URI elsewhere"
        )
    error = TrackingUnavailable(message + (f"; {detail}" if detail else ""))
    error.transient, error.cause = transient, cause
    return error


def call(fn: Callable, *args, budget_s: float, **kwargs):
    """``fn(*args, **kwargs)``, retried with exponential backoff while the store is transiently
    unavailable, for at most ``budget_s`` seconds (one attempt when 0); then ``TrackingUnavailable``.
    Errors that do not concern the store's availability (an unknown run, a bad name) pass through."""
    started = time.monotonic()
    delay = FIRST_RETRY_DELAY_S
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            found = diagnose(err)
            if found is None:
                raise
            transient, cause = found
            remaining = budget_s - (time.monotonic() - started)
            if not transient or remaining <= 0:
                waited = time.monotonic() - started if budget_s > 0 else None
                raise unavailable(cause, transient=transient, waited_s=waited) from err
            pause = min(delay, remaining)
            log.info("tracking store: %s; retrying in %.1f s", cause, pause)
            time.sleep(pause)
            delay = min(2 * delay, MAX_RETRY_DELAY_S)


class Retrying:
    """A proxy whose every method call goes through ``call`` with one budget."""

    def __init__(self, target, budget_s: float):
        self._target = target
        self._budget_s = budget_s

    def __getattr__(self, name: str):
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def retried(*args, **kwargs):
            return call(attribute, *args, budget_s=self._budget_s, **kwargs)

        return retried


class StoreOutageFilter(logging.Filter):
    """MLflow logs a full traceback for every locked or read-only SQLite statement before raising it;
    ``call`` retries that error or turns it into one line, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        errors = [record.exc_info[1]] if record.exc_info and record.exc_info[1] else []
        if isinstance(record.args, tuple):
            errors += [arg for arg in record.args if isinstance(arg, BaseException)]
        return not any(diagnose(error) is not None for error in errors)
