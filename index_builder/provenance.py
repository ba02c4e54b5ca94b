"""Does this item table and dataset belong to this checkpoint? Checked before anything is built.

The trainer records in the checkpoint a content fingerprint of the dataset folder it trained on
and hashes of its vocabularies (csmf.checkpoint.training_provenance). A bundle built from another
dataset's items or from a replaced dataset folder would publish without a complaint and serve
nonsense — items the model has no embedding for, a user snapshot the model never saw — so:

* item ids the model's vocabulary does not know → DataError with the counts, unless explicitly
  allowed (``--allow-unknown-items``: they are indexed as cold items, from their features with the
  unknown-id embedding); for a checkpoint written before provenance was recorded, a warning with
  the counts (builds that passed before keep passing);
* a dataset folder whose fingerprint differs from the recorded one → DataError naming both
  fingerprints and the files that differ, unless ``--allow-dataset-change``;
* a checkpoint written before provenance was recorded → a warning (no fingerprint to compare).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from csmf.checkpoint import Checkpoint, dataset_files, dataset_fingerprint, vocab_hash
from csmf.errors import DataError


@dataclass
class Provenance:
    """What the check found: written into the build summary, warnings shown to the user."""

    items: int
    unknown_items: int
    dataset_fingerprint: str | None  # the folder's, now
    trained_fingerprint: str | None  # the checkpoint's record (None: an old checkpoint)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return asdict(self)


def check_provenance(
    ckpt: Checkpoint,
    run: Path,
    items: pa.Table,
    items_path: Path,
    allow_unknown_items: bool = False,
    allow_dataset_change: bool = False,
) -> Provenance:
    """Raise DataError if ``items`` or the run's dataset folder is not what ``ckpt`` was trained
    on (see the module docstring); return the findings otherwise."""
    warnings: list[str] = []
    unknown = _check_items(ckpt, items, items_path, allow_unknown_items, warnings)
    recorded = ckpt.provenance.get("dataset_fingerprint")
    current = None
    if recorded is None:
        warnings.append(
            f"checkpoint {run} records no dataset fingerprint (trained before it was recorded): "
            f"cannot check that {ckpt.dataset} is the data it was trained on; retrain to record one"
        )
    else:
        if ckpt.provenance.get("item_vocab_hash") not in (None, vocab_hash(ckpt.item_vocab)):
            raise DataError(
                f"checkpoint {run}: its item vocabulary does not match the hash recorded at "
                "training; the checkpoint file was modified"
            )
        files = dataset_files(ckpt.dataset)
        current = dataset_fingerprint(files)
        if current != recorded:
            msg = _dataset_changed(ckpt, run, files, current, recorded)
            if not allow_dataset_change:
                raise DataError(
                    f"{msg}. Build from the dataset the run trained on, retrain on this one, or "
                    "pass --allow-dataset-change to build anyway"
                )
            warnings.append(f"{msg} (--allow-dataset-change)")
    return Provenance(items.num_rows, unknown, current, recorded, warnings)


def _check_items(
    ckpt: Checkpoint, items: pa.Table, items_path: Path, allow: bool, warnings: list[str]
) -> int:
    id_col = ckpt.features.item.id_column
    if id_col not in items.column_names:
        raise DataError(
            f"item table {items_path} lacks id column {id_col!r}; has {items.column_names}"
        )
    ids = pc.cast(items.column(id_col), pa.string())
    known = pc.is_in(ids, value_set=ckpt.item_vocab.ids.arrow_values())
    unknown = int(pc.sum(pc.invert(pc.fill_null(known, False))).as_py() or 0)
    if not unknown:
        return 0
    examples = pc.filter(ids, pc.invert(pc.fill_null(known, False)))[:3].to_pylist()
    what = (
        f"item table {items_path} has {unknown:,} of {items.num_rows:,} item ids "
        f"({unknown / items.num_rows:.1%}) that the model was not trained on (e.g. {examples}; "
        f"the checkpoint knows {ckpt.item_vocab.ids.size:,} items)"
    )
    if allow:
        warnings.append(f"{what}: indexed as cold items (--allow-unknown-items)")
    elif not ckpt.provenance:  # an old checkpoint: builds that used to pass keep passing, loudly
        warnings.append(
            f"{what}: indexed as cold items. This checkpoint predates provenance records, so this "
            "is a warning; with a checkpoint from today's `csmf train` it is an error unless "
            "--allow-unknown-items"
        )
    else:
        raise DataError(
            f"{what}. Index the run's own items, retrain on data that has them, or pass "
            "--allow-unknown-items to index them as cold items (features only, no id embedding)"
        )
    return unknown


def _dataset_changed(
    ckpt: Checkpoint, run: Path, files: dict[str, str], current: str, recorded: str
) -> str:
    before = ckpt.provenance.get("dataset_files", {})
    changed = sorted(n for n in set(files) | set(before) if files.get(n) != before.get(n))
    return (
        f"dataset {ckpt.dataset} has fingerprint {current}, but run {run} was trained on a "
        f"dataset with fingerprint {recorded} (differing files: {', '.join(changed) or '?'}); "
        "the folder was replaced or modified since training"
    )
