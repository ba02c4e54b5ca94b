import sys
from pathlib import Path

# The tiny bundle fixtures live with the index builder's tests; the bundle tests share them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "index_builder"))

from bundle_fixtures import flat_bundle, tiny_dataset, tiny_run  # noqa: E402, F401
