import sys
from pathlib import Path

# The service fixtures (bundles, `csmf serve` and redis-server processes) are shared.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from service_fixtures import (  # noqa: E402, F401
    bundles,
    corrupt_bundle,
    make_client,
    redis_prefix,
    redis_server,
    serve,
    service_runs,
)
