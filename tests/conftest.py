"""Settings of the whole test process (made before any test module imports Ray) and fixtures shared by
several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Every Ray the suite starts (local ``ray.init()`` or the loopback cluster of test_grid_cluster) is a
# throwaway one on this machine: no token authentication, for the whole process and not per test.
# A local ``ray.init()`` with RAY_AUTH_MODE unset switches its process to token mode for good: Ray
# sets the variable and refreshes its cached C++ config, which later changes of the variable do not
# reach. A driver left in token mode that joins a cluster started without a token rejects the calls
# its GCS makes to it, so the GCS destroys the driver's actors before they start (ActorDiedError,
# "all references to the actor were removed", REF_DELETED): the two-node grid tests failed whenever
# test_epg's local Ray ran before them in the same pytest process.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables created (creating them takes seconds; copying does not)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the stages' cells and MAML run (same bits as theirs); restored afterwards
    for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serial_grid(tmp_path_factory) -> dict:
    """The tiny metagrad grid run serially (grid_helpers.serial_reference), the reference of the grid
    tests in test_grid.py and test_grid_cluster.py: trained once per session."""
    from grid_helpers import serial_reference

    return serial_reference(tmp_path_factory.mktemp("serial"))
