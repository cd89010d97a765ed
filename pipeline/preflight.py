"""What a stage needs from outside, checked before it does any work (and before its MLflow run exists).

- the tracking store answers and can be written (``tracking.check_store``);
- every registry URI among the stage's params (``evaluate.epg.loss: models:/epg-loss@champion``)
  names an existing version or alias;
- a Ray cluster named by ``RAY_ADDRESS`` answers, when the stage's params ask for Ray actors.

Each failure is a ``StageStop`` with one line naming the key, URI or address; ``stage_main`` prints it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from .config import flatten
from .errors import BadReference, ServiceUnavailable

RAY_CONNECT_ENV, RAY_CONNECT_DEFAULT_S = "PIPELINE_RAY_CONNECT_S", 15.0


def preflight(section: Mapping) -> None:
    """Check the store, the registry references and Ray for a stage whose params are ``section``
    (``config.section_dict``)."""
    from . import tracking

    tracking.check_store()
    check_registry_references(section)
    actors = max((v for k, v in flatten(dict(section)).items() if k.endswith("num_actors")), default=0)
    if actors > 1:
        check_ray_address(os.environ.get("RAY_ADDRESS", ""))


def registry_references(section: Mapping) -> dict[str, str]:
    """{flattened key: URI} of the params that name a registry version."""
    return {
        key: value
        for key, value in flatten(dict(section)).items()
        if isinstance(value, str) and value.startswith("models:/")
    }


def check_registry_references(section: Mapping) -> None:
    from . import registry

    for key, uri in registry_references(section).items():
        try:
            registry.check_reference(uri)
        except BadReference as err:
            raise BadReference(f"{key}: {uri}: {err}") from None


def check_ray_address(address: str, budget_s: float | None = None) -> None:
    """Fail within ``budget_s`` (PIPELINE_RAY_CONNECT_S, default 15) when nothing listens at the
    Ray address; ``auto``, ``local`` and no address at all leave the choice to Ray."""
    if address in ("", "auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ServiceUnavailable(f"RAY_ADDRESS={address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    if budget_s is None:
        text = os.environ.get(RAY_CONNECT_ENV, "")
        budget_s = float(text) if text else RAY_CONNECT_DEFAULT_S
    started, delay = time.monotonic(), 0.25
    while True:
        remaining = budget_s - (time.monotonic() - started)
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(remaining, 5.0))).close()
            return
        except OSError as err:
            if remaining <= delay:
                cause = err.strerror or type(err).__name__
                raise ServiceUnavailable(
                    f"RAY_ADDRESS={address}: no Ray cluster answers ({cause}, tried for {budget_s:.0f} s); "
                    "start the cluster, or unset RAY_ADDRESS to run Ray locally"
                ) from None
        time.sleep(delay)
        delay = min(2 * delay, 5.0)
