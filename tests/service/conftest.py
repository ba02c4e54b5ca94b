import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_fixtures import (  # noqa: E402, F401
    bundles,
    corrupt_bundle,
    make_client,
    redis_prefix,
    redis_server,
    serve,
    service_runs,
)
