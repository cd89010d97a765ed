"""Settings of the whole test process, made before any test module imports Ray."""

import os

# Every Ray the suite starts (local ``ray.init()`` or the loopback cluster of test_grid) is a
# throwaway one on this machine: no token authentication, for the whole process and not per test.
# A local ``ray.init()`` with RAY_AUTH_MODE unset switches its process to token mode for good: Ray
# sets the variable and refreshes its cached C++ config, which later changes of the variable do not
# reach. A driver left in token mode that joins a cluster started without a token rejects the calls
# its GCS makes to it, so the GCS destroys the driver's actors before they start (ActorDiedError,
# "all references to the actor were removed", REF_DELETED): the two-node grid tests failed whenever
# test_epg's local Ray ran before them in the same pytest process.
os.environ["RAY_AUTH_MODE"] = "disabled"
