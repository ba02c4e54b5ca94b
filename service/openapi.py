"""The OpenAPI document, made to agree with what the server enforces for the bundle it serves.

Request ``weights`` accept the served cascade's objective names only and, as a list, exactly one
weight per objective (service/schemas.py marks those schemas with ``x-csmf-weights``). The names
depend on the bundle, so they are filled in when the document is requested, for the bundle then
served, and recomputed if a reload changes the cascade. Before a bundle is loaded the document
has the static constraints only.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

MARK = "x-csmf-weights"


def _fill(node: Any, objectives: tuple[str, ...] | None) -> None:
    """Drop every weights marker; with ``objectives``, constrain the names and the list length."""
    if isinstance(node, dict):
        if node.pop(MARK, False) and objectives:
            for alt in node["anyOf"]:
                if alt["type"] == "object":
                    alt["propertyNames"] = {"enum": list(objectives)}
                    alt["maxProperties"] = len(objectives)
                else:
                    alt["minItems"] = alt["maxItems"] = len(objectives)
        for v in node.values():
            _fill(v, objectives)
    elif isinstance(node, list):
        for v in node:
            _fill(v, objectives)


def install_openapi(app: FastAPI) -> None:
    base = app.openapi  # FastAPI's generator (caches the static document)
    cache: dict[tuple[str, ...] | None, dict] = {}

    def openapi() -> dict:
        retriever = app.state.csmf.bundle.retriever  # None until the lifespan loaded it
        key = None if retriever is None else tuple(retriever.objectives)
        if key not in cache:
            doc = copy.deepcopy(base())
            _fill(doc, key)
            cache.clear()
            cache[key] = doc
        return cache[key]

    app.openapi = openapi
