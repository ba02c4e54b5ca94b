"""Fixtures shared across the test folders, registered once so each session-scoped artifact
(a tiny dataset, a random-weight checkpoint, a small trained one, bundles built by the real
builder, Redis and service processes) is built once per run. Folder-specific fixtures live in that
folder's conftest.py."""

import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes `fixtures` importable

from fixtures.bundles import flat_bundle, tiny_dataset, tiny_run  # noqa: E402, F401
from fixtures.datasets import make_dataset  # noqa: E402, F401
from fixtures.milvus import milvus_server  # noqa: E402, F401
from fixtures.services import (  # noqa: E402, F401
    bundles,
    corrupt_bundle,
    make_client,
    redis_prefix,
    redis_server,
    serve,
    service_runs,
)
from fixtures.trained import trained_bundle, trained_onnx_bundle, trained_run  # noqa: E402, F401


def pytest_configure(config):
    """One torch thread in the test process, whatever the test order. torch's threads are
    process-wide and a config with train.threads = 0 keeps them: alone, a test of the tiny
    configs ran with one thread per core, beside the suite's own servers and other jobs (OpenMP
    oversubscription: test_baselines.py took 7 min instead of 30 s). Subprocesses set theirs."""
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist with ``--dist loadgroup`` (`make test`), a worker runs a whole test
    module, so a module's fixtures are built once; the modules that reach the real Milvus server
    all go to one worker (one server per machine: tests/fixtures/milvus.py), in file order, so
    the outage test's kill and restart never overlaps another test's searches."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    modules: dict[str, list] = defaultdict(list)
    for item in items:
        modules[item.nodeid.split("::")[0]].append(item)
    for path, module_items in modules.items():
        milvus = any(
            "milvus_server" in getattr(i, "fixturenames", ()) or "milvus-server" in i.nodeid
            for i in module_items
        )
        group = pytest.mark.xdist_group("milvus-server" if milvus else path)
        for item in module_items:
            item.add_marker(group)
