"""The identity of this run (one `luigi` invocation), shared with forked worker processes."""

import os
import uuid

# Set once in the process that starts the run; forked workers inherit the environment.
RUN_ID = os.environ.setdefault("VISITAS_RUN_ID", uuid.uuid4().hex[:12])
