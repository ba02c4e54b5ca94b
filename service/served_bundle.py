"""The bundle and index being served: the feature store the user tower reads, the current
:class:`Retriever` (swapped atomically on reload), and the announcement of reloads to the other
workers of the server (docs/design.md#hot-reload).

Hot reload: load and verify the new bundle fully (checksums, dimensions, a smoke search) off the
request path, then replace one reference. Requests already running finish on the old Retriever;
a bundle that fails any check never becomes visible. With several workers (``csmf serve
--workers N``) the worker that reloaded writes ``control_dir/bundle.json``; the others poll it and
load the same bundle, so the whole server converges within a poll interval plus a load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path

from csmf.atomic import atomic_write_text
from csmf.bundle import Bundle, load_bundle
from csmf.catalogue import Catalogue
from csmf.errors import BundleError
from service.errors import ConflictError, ReloadError
from service.feature_store import BundleFeatureStore, RedisFeatureStore
from service.metrics import ServiceMetrics
from service.retriever import Retriever
from service.settings import Settings
from service.sync import BackgroundSync

log = logging.getLogger("csmf.service")
CONTROL_FILE = "bundle.json"


class ServedBundle:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.retriever: Retriever | None = None  # requests read it once each
        self.features: BundleFeatureStore | RedisFeatureStore | None = None
        self._reload_lock = threading.Lock()
        # item writes and the swap of a reloaded bundle: a write lands on the retriever that
        # will be served, and a reloaded one has caught up with every acknowledged write
        self._write_lock = threading.Lock()
        self.items = None  # service.item_sync.ItemSync, once started
        self._control: BackgroundSync | None = None
        self._control_sig: tuple | None = None
        stage = metrics.stage
        self._observe = lambda name, seconds: stage[name].observe(seconds)

    # -- lifecycle --------------------------------------------------------------------------------

    def open(self) -> None:
        """The feature store (not started yet) and the announced or configured bundle, verified
        and smoke-searched."""
        s, m = self.settings, self.metrics
        path = self._announced_path() or s.bundle
        if s.feature_store == "redis":
            self.features = RedisFeatureStore(
                s.redis_url, s.redis_prefix, s.sync_interval_s, s.redis_timeout_s,
                on_state=lambda up: m.store_up.labels("features").set(int(up)),
                on_error=lambda: m.store_errors_total.labels("features").inc(),
            )  # fmt: skip
        else:
            self.features = BundleFeatureStore()
            m.store_up.labels("features").set(1)
        self.retriever = self._build(self._load(path, s.verify_bundle))

    def follow_announcements(self) -> None:
        """With a control folder (several workers): follow reloads another worker announces."""
        if self.settings.control_dir is None:
            return
        self._control = BackgroundSync(
            "bundle", self._follow_announcement, self.settings.sync_interval_s, lambda up: None,
            lambda: self.metrics.reloads_total.labels("failure").inc(),
        )  # fmt: skip
        self._control.start()

    def follow_items(self) -> None:
        """Follow item writes made by other workers, replicas and the CLI (the item log)."""
        from service.item_sync import ItemSync

        self.items = ItemSync(self, self.settings, self.metrics)
        self.items.start()

    def catch_up(self) -> int:
        """Apply the item-log records this worker has not applied yet."""
        with self._write_lock:
            return self.retriever.catalogue.catch_up()

    def write_items(self, write):
        """``write(catalogue) → Record | None`` under the write lock, then acknowledged: the
        record is durable and applied here, and every live replica applied it (item_sync)."""
        with self._write_lock:
            cat = self.retriever.catalogue
            rec = write(cat)
        if rec is not None and self.items is not None:
            self.items.acknowledge(cat.log.path.name, rec.seq)
        return rec

    def _swap(self, new: Retriever) -> None:
        with self._write_lock:
            new.catalogue.catch_up()  # writes acknowledged while it loaded
            self.retriever = new

    def stop(self) -> None:
        for part in (self._control, self.features, self.items):
            if part is not None:
                part.stop()

    # -- reload -----------------------------------------------------------------------------------

    def _load(self, path: str | Path, verify: bool) -> Bundle:
        s = self.settings
        return load_bundle(path, verify=verify, index_uri=s.index_uri, encoder=s.encoder)

    def _build(self, bundle: Bundle) -> Retriever:
        """A Retriever for ``bundle`` with its item log replayed, after a smoke search: finite
        scores, valid rows."""
        catalogue = Catalogue(bundle)
        catalogue.catch_up()
        r = Retriever(bundle, self.features.lookup, self._observe)
        r.catalogue = catalogue
        catalogue.listeners.append(r.on_items)
        k = min(5, r.n_items)
        hits = r.retrieve(None, None, r.scale(tuple(1.0 for _ in r.objectives)), k)
        if len(hits.rows) != k or not all(math.isfinite(s) for s in hits.scores):
            raise BundleError(
                f"bundle {bundle.path} failed the smoke search: {hits.rows} {hits.scores}"
            )
        return r

    def reload(self, path: str | None) -> tuple[Retriever, Retriever]:
        """Load, verify and swap in the bundle at ``path`` (default: the configured one).
        Returns (old, new). Raises ReloadError and keeps the old one serving on any failure."""
        if not self._reload_lock.acquire(blocking=False):
            raise ConflictError("a reload is already running; try again when it has finished")
        old = self.retriever
        try:
            target = Path(path) if path else self.settings.bundle
            try:
                new = self._build(self._load(target, True))
            except Exception as exc:
                self.metrics.reloads_total.labels("failure").inc()
                log.error(
                    "reload of %s failed, still serving %s: %s", target, old.model_version, exc
                )
                msg = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
                raise ReloadError(
                    f"reload failed, still serving {old.model_version}: {msg}", old.model_version
                ) from None
            self._swap(new)  # the swap: one reference assignment
            self.metrics.reloads_total.labels("success").inc()
            log.info("reloaded %s (%s → %s)", target, old.model_version, new.model_version)
            self._announce(new)
            return old, new
        finally:
            self._reload_lock.release()

    def _control_path(self) -> Path | None:
        d = self.settings.control_dir
        return None if d is None else Path(d) / CONTROL_FILE

    def _announced_path(self) -> Path | None:
        p = self._control_path()
        if p is None or not p.exists():
            return None
        return Path(json.loads(p.read_text())["path"])

    def _announce(self, r: Retriever) -> None:
        p = self._control_path()
        if p is None:
            return
        atomic_write_text(
            p,
            json.dumps(
                {
                    "path": str(r.bundle.path),
                    "model_version": r.model_version,  # with `folded`: a compaction in place
                    "folded": r.catalogue.folded if r.catalogue is not None else 0,
                }
            ),
        )
        self._control_sig = _sig(p)

    def _follow_announcement(self) -> None:
        p = self._control_path()
        sig = _sig(p)
        if sig is not None and sig != self._control_sig:
            doc = json.loads(p.read_text())
            cur = self.retriever
            folded = cur.catalogue.folded if cur.catalogue is not None else 0
            now = (str(cur.bundle.path), cur.model_version, folded)
            if (doc["path"], doc["model_version"], doc.get("folded", folded)) != now:
                with self._reload_lock:
                    new = self._build(self._load(doc["path"], self.settings.verify_bundle))
                    self._swap(new)
                self.metrics.reloads_total.labels("success").inc()
                log.info("followed reload announced by another worker: %s", new.model_version)
            self._control_sig = sig
        self._control.mark_ok()
        self._control.wait(self.settings.sync_interval_s)


def _sig(p: Path | None) -> tuple | None:
    try:
        st = os.stat(p)
    except (FileNotFoundError, TypeError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
