"""Fixtures shared across the test folders, registered once so each session-scoped artifact
(a tiny dataset, a random-weight checkpoint, a small trained one, bundles built by the real
builder, Redis and service processes) is built once per run. Folder-specific fixtures live in that
folder's conftest.py."""

import sys
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


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (`make test`): whole modules per worker, the Milvus-server modules
    together (tests/fixtures/scheduling.py)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from fixtures.scheduling import ModuleScheduling

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """A module on the real Milvus server that the xdist scheduler would not recognise fails."""
    if config.pluginmanager.hasplugin("xdist"):
        from fixtures.scheduling import check_milvus_modules

        check_milvus_modules(items)
