"""Item writes behind the admin bearer token: ``PUT /admin/items`` (add or replace items) and
``DELETE /admin/items`` (by id), also under ``/v1/admin/items`` (docs/design.md#item-writes).

Batched (at most ``max_item_batch``), idempotent (an upsert replaces, deleting an absent id is a
no-op), per-item errors by id while the good items are written. The response comes back once the
write is fsynced to the item log, applied here, and applied by every live replica."""

from __future__ import annotations

from fastapi import APIRouter

from csmf.catalogue import check_ids, check_items
from service.deps import Admin, State
from service.errors import PayloadTooLargeError
from service.schemas import ItemError, ItemIdsIn, ItemsIn, ItemsOut

router = APIRouter(tags=["admin"], dependencies=[Admin])
RESPONSES = {
    401: {"description": "no bearer token"},
    403: {"description": "wrong token or admin disabled"},
    413: {"description": "more items than max_item_batch"},
    503: {"description": "durable, but not yet confirmed applied by every live replica"},
}


def _errors(errors: dict[str, str]) -> list[ItemError]:
    return [ItemError(item_id=k, error=v) for k, v in errors.items()]


def put_items(body: ItemsIn, state: State) -> ItemsOut:
    """Add or replace items (the whole item: columns it omits become null)."""
    limit = state.settings.max_item_batch
    served = state.bundle
    try:
        checked = check_items(served.retriever.catalogue, body.items, limit)
    except ValueError as exc:
        raise PayloadTooLargeError(str(exc)) from None
    rec = served.write_items(lambda cat: cat.upsert(checked))
    return ItemsOut(
        seq=None if rec is None else rec.seq, written=checked.ids, errors=_errors(checked.errors)
    )


def delete_items(body: ItemIdsIn, state: State) -> ItemsOut:
    """Delete items by id; once this returns no replica serves them."""
    try:
        ids, errors = check_ids(body.ids, state.settings.max_item_batch)
    except ValueError as exc:
        raise PayloadTooLargeError(str(exc)) from None
    present: list[str] = []

    def write(cat):
        b = cat.bundle
        rows = b.item_rows
        present.extend(i for i in ids if (r := rows.get(i)) is not None and not b.dead[r])
        return cat.delete(ids)

    rec = state.bundle.write_items(write)
    gone = set(present)
    return ItemsOut(
        seq=None if rec is None else rec.seq,
        written=present,
        absent=[i for i in ids if i not in gone],
        errors=_errors(errors),
    )


for path, schema in (("/admin/items", True), ("/v1/admin/items", False)):
    router.put(path, response_model=ItemsOut, responses=RESPONSES, include_in_schema=schema)(
        put_items
    )
    router.delete(path, response_model=ItemsOut, responses=RESPONSES, include_in_schema=schema)(
        delete_items
    )
