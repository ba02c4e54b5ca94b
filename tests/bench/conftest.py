"""The trainer tests' tiny dataset and config: `csmf bench` trains on them."""

from tests.trainer.conftest import tiny_config_path, tiny_data  # noqa: F401
