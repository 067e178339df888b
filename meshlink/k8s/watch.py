"""List-then-watch of one resource into an in-memory cache (kopf's habit).

A ``Watcher`` lists, then watches from the list's resourceVersion with bookmarks and a
server-side timeout, resuming from the last seen resourceVersion. A 410 (the version is too
old) means relist, and the relist is diffed against the cache so the handler sees exactly
the adds, changes and deletes it missed. When the API server goes away the watcher retries
with jittered backoff; ``ApiHealth`` turns that into one log line down and one line up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Final

from meshlink.errors import KubeError
from meshlink.k8s.api import Gone, Kube, NotFound, Resource
from meshlink.k8s.model import Obj

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0

ObjKey = tuple[str, str]
Handler = Callable[[ObjKey, Obj | None, Obj | None], None]
"""Called as handler(key, old, new): old None for an add, new None for a delete."""


def obj_key(obj: Obj) -> ObjKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def trim_managed_fields(obj: Obj) -> Obj:
    """managedFields is the largest part of an applied object and is never read here."""
    meta = obj.get("metadata")
    if meta is not None:
        meta.pop("managedFields", None)
    return obj


class ApiHealth:
    """Whether one API server answers; logs one line when it goes away and one when it is
    back, not one per failed request. A failure right after a success (an API server
    that is still warming up its caches) is not announced."""

    SETTLE: Final = 2.0

    def __init__(self, name: str):
        self.name = name
        self.down = False
        self.announced = False
        self.last_ok = 0.0
        self.down_since = 0.0

    def failed(self, err: Exception) -> None:
        now = time.monotonic()
        if not self.down:
            self.down = True
            self.down_since = now
        if not self.announced and now - max(self.last_ok, self.down_since - self.SETTLE) >= (
            self.SETTLE
        ):
            self.announced = True
            log.warning("API server %s unreachable (%s); retrying", self.name, err)
        else:
            log.debug("API server %s: %s", self.name, err)

    def ok(self) -> None:
        self.last_ok = time.monotonic()
        if self.down:
            self.down = False
            if self.announced:
                self.announced = False
                log.info("API server %s reachable again; watches resumed", self.name)


class Watcher:
    """Cache of one resource kept current by list + watch. Run ``run()`` as a task."""

    def __init__(
        self,
        kube: Kube,
        res: Resource,
        handler: Handler,
        health: ApiHealth,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        trim: Callable[[Obj], Obj] = trim_managed_fields,
        watch_timeout: int = 240,
    ):
        self.kube = kube
        self.res = res
        self.handler = handler
        self.health = health
        self.namespace = namespace
        self.label_selector = label_selector
        self.trim = trim
        self.watch_timeout = watch_timeout
        self.cache: dict[ObjKey, Obj] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.relists = 0
        self.missing = False

    def get(self, key: ObjKey) -> Obj | None:
        return self.cache.get(key)

    def wrote(self, obj: Obj) -> None:
        """Our own write of ``obj``, known before its watch event: the cache holds it now
        (so a reconcile right after does not write the same again); the event replaces it.
        Only an object with the cached one's uid is taken (not one deleted and recreated)."""
        key = obj_key(obj)
        cur = self.cache.get(key)
        if cur is not None and (cur.get("metadata") or {}).get("uid") == (
            obj.get("metadata") or {}
        ).get("uid"):
            self.cache[key] = self.trim(obj)

    def deleted(self, key: ObjKey) -> None:
        """Our own delete of ``key``, known before its watch event."""
        self.cache.pop(key, None)

    def _emit(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        try:
            self.handler(key, old, new)
        except Exception:
            # A handler bug must not stop the watch of every other object.
            log.exception("handler for %s %s/%s failed", self.res.kind, *key)

    async def _relist(self) -> None:
        items, rv = await self.kube.list(self.res, self.namespace, self.label_selector)
        fresh: dict[ObjKey, Obj] = {}
        for raw in items:
            item = self.trim(raw)
            fresh[obj_key(item)] = item
        old_cache = self.cache
        self.cache = fresh
        for key, gone in old_cache.items():
            if key not in fresh:
                self._emit(key, gone, None)
        for key, new in fresh.items():
            old = old_cache.get(key)
            if old is None or _rv(old) != _rv(new):
                self._emit(key, old, new)
        self.resource_version = rv
        self.relists += 1

    def _apply_event(self, event: Obj) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        rv = _rv(obj)
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        obj = self.trim(obj)
        key = obj_key(obj)
        old = self.cache.get(key)
        if etype == "DELETED":
            if old is not None:
                del self.cache[key]
                self._emit(key, old, None)
        elif etype in ("ADDED", "MODIFIED"):
            self.cache[key] = obj
            self._emit(key, old, obj)
        if rv:
            self.resource_version = rv

    async def run(self) -> None:
        backoff = BACKOFF_MIN
        what = f"{self.res.kind} ({self.res.api_version})"
        while True:
            try:
                if not self.resource_version:
                    await self._relist()
                    self.missing = False
                    self.synced.set()
                    self.health.ok()
                    backoff = BACKOFF_MIN
                jitter = random.randint(0, self.watch_timeout // 4)  # noqa: S311
                events = self.kube.watch(
                    self.res,
                    self.resource_version,
                    self.watch_timeout + jitter,
                    self.namespace,
                    self.label_selector,
                )
                async with aclosing(events):
                    async for event in events:
                        self.health.ok()
                        backoff = BACKOFF_MIN
                        self._apply_event(event)
            except Gone:
                log.debug("%s watch expired (410); relisting", what)
                self.resource_version = ""
            except NotFound as e:
                # The API itself is missing (CRD not installed): say so once, keep trying.
                if not self.missing:
                    self.missing = True
                    log.warning(
                        "%s is not served by the API server (%s): install the CRDs in "
                        "manifests/crds; retrying",
                        what,
                        e,
                    )
                await asyncio.sleep(BACKOFF_MAX)
            except KubeError as e:
                self.health.failed(e)
                await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311
                backoff = min(backoff * 2, BACKOFF_MAX)


def _rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
