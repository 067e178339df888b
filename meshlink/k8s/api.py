"""A small raw-JSON client over one kubernetes_asyncio ``ApiClient``.

The controller works on plain dicts (the API's JSON), not on the generated models: model
deserialisation costs more than the rest of a reconcile, and custom resources are dicts
anyway. Every request goes through ``ApiClient.call_api`` (so authentication, TLS and the
connection pool are the library's) with an explicit timeout; no request is ever unbounded.
Server-side apply goes through ``apply()``, the one place that sets the apply content type.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from meshlink.errors import KubeError
from meshlink.k8s.model import Obj

FIELD_MANAGER: Final = "meshlink"
APPLY_CONTENT_TYPE: Final = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE: Final = "application/merge-patch+json"
LIST_PAGE: Final = 500


@dataclass(frozen=True, slots=True)
class Resource:
    """One API resource: where it lives and what it is called."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, sub: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if sub:
                base += f"/{sub}"
        return base


MCS: Final = "multicluster.x-k8s.io"
SERVICE_EXPORT: Final = Resource(MCS, "v1beta1", "serviceexports", "ServiceExport")
SERVICE_IMPORT: Final = Resource(MCS, "v1beta1", "serviceimports", "ServiceImport")
SERVICE: Final = Resource("", "v1", "services", "Service")
ENDPOINT_SLICE: Final = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
NAMESPACE: Final = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
POD: Final = Resource("", "v1", "pods", "Pod")
EVENT: Final = Resource("events.k8s.io", "v1", "events", "Event")
CLUSTER_PROPERTY: Final = Resource(
    "about.k8s.io", "v1alpha1", "clusterproperties", "ClusterProperty", namespaced=False
)


class Gone(KubeError):
    """410: the resourceVersion we watched from is too old; relist."""


class NotFound(KubeError):
    """404."""


class Invalid(KubeError):
    """422 (or 400): the API server refused the object; the message says why."""


class Unavailable(KubeError):
    """The API server could not be reached or did not answer in time."""


class NotLeader(KubeError):
    """A write refused before it was sent: this replica does not hold the site's Lease
    (k8s/lease.py), so another may be writing."""


def _status_error(status: int, body: str) -> ApiException:
    e = ApiException(status=status, reason="")
    e.body = body.encode()
    return e


def _api_error(e: ApiException, what: str) -> KubeError:
    message = what
    raw: object = e.body
    body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if isinstance(body, str) and body:
        try:
            message = f"{what}: {json.loads(body).get('message', body)}"
        except (ValueError, AttributeError):
            message = f"{what}: {body[:300]}"
    elif e.reason:
        message = f"{what}: {e.reason}"
    status = e.status or 0
    if status == 410:
        return Gone(message)
    if status == 404:
        return NotFound(message)
    if status in (400, 422):
        return Invalid(message)
    if status in (0, 429) or status >= 500:
        return Unavailable(f"{message} (HTTP {status})")
    return KubeError(f"{message} (HTTP {status})")


_PROXY_VARS: Final = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "netrc")


def _skip_env_lookups(api: ApiClient) -> None:
    """kubernetes_asyncio opens its aiohttp session with ``trust_env=True``, which costs two
    thread-pool hops per request (proxy variables and ~/.netrc). When there is nothing to
    find, switch it off: measured as about a tenth of the controller's CPU at scale."""
    env = {k.lower() for k, v in os.environ.items() if v}
    if env & set(_PROXY_VARS) or (Path.home() / ".netrc").exists():
        return
    session = getattr(getattr(api, "rest_client", None), "pool_manager", None)
    if isinstance(session, aiohttp.ClientSession) and hasattr(session, "_trust_env"):
        session._trust_env = False


def _abort_closed_tls(api: ApiClient) -> None:
    """Have the connector abort the TLS connections it closes (aiohttp's
    ``enable_cleanup_closed``, which kubernetes_asyncio does not set): a request cancelled
    in flight is closed inside aiohttp with a graceful TLS shutdown that waits for the
    server's close_notify; if that never comes before the loop ends, the socket stays open
    (``ResourceWarning: unclosed socket``). The connector aborts them every 2 s and when the
    ApiClient closes. Python >= 3.12.7 aborts them itself (``NEEDS_CLEANUP_CLOSED``)."""
    session = getattr(getattr(api, "rest_client", None), "pool_manager", None)
    connector = session.connector if isinstance(session, aiohttp.ClientSession) else None
    if (
        aiohttp.connector.NEEDS_CLEANUP_CLOSED
        and isinstance(connector, aiohttp.BaseConnector)
        and getattr(connector, "_cleanup_closed_disabled", False) is True
        and not connector.closed
    ):
        connector._cleanup_closed_disabled = False
        connector._cleanup_closed()  # starts the periodic abort


WATCH_KEEPALIVE: Final = (5, 2, 3)
"""TCP keepalive of a watch connection: first probe after 5 s idle, then every 2 s, dead
after 3 unanswered. A watch is a long read; when the network between meshlink and the API
server goes away for longer than the server's own keepalive (a node cut off and back), the
server forgets the connection and its FIN is lost: without probes of our own the watch
waits for its read timeout (minutes) while the API server changes under it. A probe after
the network returns gets a RST at once."""


def _keep_alive(resp: aiohttp.ClientResponse) -> None:
    conn = resp.connection
    sock = conn.transport.get_extra_info("socket") if conn and conn.transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, count = WATCH_KEEPALIVE
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:  # not TCP after all: the read timeout still bounds the watch
        pass


_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _discard(resp: aiohttp.ClientResponse) -> None:
    """Drop a response whose body was not read to the end (a watch, a cancelled or timed-out
    read). ``resp.close()`` alone starts a graceful TLS shutdown that nobody waits for: when
    the API server does not answer the close_notify before the event loop ends (a busy or
    stopped server), the socket is never closed (``ResourceWarning: unclosed socket``).
    Aborting the transport closes the socket on the loop's next turn, whatever the server."""
    conn = resp.connection
    transport = conn.transport if conn is not None else None
    if transport is not None:
        transport.abort()
    resp.close()


class Kube:
    """Raw JSON access to one API server, every request bounded by ``timeout`` seconds."""

    def __init__(
        self, api: ApiClient, timeout: float, fence: Callable[[], bool] | None = None
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.fence = fence
        """Asked right before every write: may this replica write now (it holds the Lease)?
        None: always (one replica, no election)."""
        self.requests: Counter[str] = Counter()
        """Requests sent, by what they did (``apply serviceimports/status``...); writes the
        fence refused count as ``fenced <verb> <kind>``."""
        _skip_env_lookups(api)
        _abort_closed_tls(api)

    def _fenced(self, what: str) -> None:
        if self.fence is not None and not self.fence():
            verb, kind = [*what.split(" "), ""][:2]
            self.requests[f"fenced {verb} {kind}"] += 1
            raise NotLeader(f"{what}: not written, this replica does not hold the lease")

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: object = None,
        content_type: str | None = None,
        limits: float | aiohttp.ClientTimeout | None = None,
        stream: bool = False,
    ) -> Any:
        verb, kind = [*what.split(" "), ""][:2]
        self.requests[f"{verb} {kind}{'/status' if path.endswith('/status') else ''}"] += 1
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            resp = await self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=limits if limits is not None else self.timeout,
            )
        except ApiException as e:
            raise _api_error(e, what) from None
        except _TRANSPORT_ERRORS as e:
            raise Unavailable(f"{what}: {type(e).__name__}: {e}") from None
        if stream:
            return resp
        read = False
        try:
            if not 200 <= resp.status <= 299:
                text = await resp.text()
                read = True
                raise _api_error(_status_error(resp.status, text), what)
            data = await resp.read()
            read = True
        except _TRANSPORT_ERRORS as e:
            raise Unavailable(f"{what}: {type(e).__name__}: {e}") from None
        finally:
            if read:
                resp.release()  # read to the end: back to the pool
            else:
                _discard(resp)
        return json.loads(data) if data else None

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        return cast(
            Obj, await self._call("GET", res.path(namespace, name), f"get {res.kind} {name}")
        )

    async def list(
        self, res: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> tuple[list[Obj], str]:
        """Every object (paged), and the list's resourceVersion to watch from."""
        items: list[Obj] = []
        cont = ""
        while True:
            query = [("limit", str(LIST_PAGE))]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if cont:
                query.append(("continue", cont))
            page = await self._call("GET", res.path(namespace), f"list {res.plural}", query=query)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return items, str(meta.get("resourceVersion", ""))

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        timeout_seconds: int,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> AsyncGenerator[Obj, None]:
        """Watch events (dicts with type and object) until the server ends the watch.

        An ERROR event raises (``Gone`` for 410). Reads are bounded: the server sends a
        bookmark or ends the watch within ``timeout_seconds``.
        """
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        what = f"watch {res.plural}"
        limits = aiohttp.ClientTimeout(
            sock_connect=self.timeout,
            connect=self.timeout,
            sock_read=timeout_seconds + self.timeout,
        )
        resp = await self._call(
            "GET", res.path(namespace), what, query=query, limits=limits, stream=True
        )
        _keep_alive(resp)
        try:
            if not 200 <= resp.status <= 299:
                try:
                    text = await resp.text()
                except _TRANSPORT_ERRORS as e:  # the API server went away mid-answer
                    raise Unavailable(f"{what}: connection lost ({type(e).__name__})") from None
                raise _api_error(_status_error(resp.status, text), what)
            while True:
                try:
                    line = await resp.content.readline()
                except _TRANSPORT_ERRORS as e:
                    raise Unavailable(f"{what}: connection lost ({type(e).__name__})") from None
                if not line:
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    raise Unavailable(f"{what}: undecodable event {line[:80]!r}") from None
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise _api_error(
                        ApiException(status=status.get("code", 500), reason=status.get("message")),
                        what,
                    )
                yield event
        finally:
            _discard(resp)  # an unfinished watch cannot go back to the pool

    async def apply(
        self, res: Resource, obj: Obj, sub: str | None = None, manager: str = FIELD_MANAGER
    ) -> Obj:
        """Server-side apply as field manager ``manager`` (meshlink), forcing ownership."""
        meta = obj["metadata"]
        name = meta["name"]
        what = f"apply {res.kind} {meta.get('namespace', '')}/{name}"
        self._fenced(what)
        return cast(
            Obj,
            await self._call(
                "PATCH",
                res.path(meta.get("namespace"), name, sub),
                what,
                query=[("fieldManager", manager), ("force", "true")],
                body=obj,
                content_type=APPLY_CONTENT_TYPE,
            ),
        )

    async def merge_patch(
        self, res: Resource, name: str, namespace: str | None, patch: Obj, sub: str | None = None
    ) -> Obj:
        self._fenced(f"patch {res.kind} {namespace}/{name}")
        return cast(
            Obj,
            await self._call(
                "PATCH",
                res.path(namespace, name, sub),
                f"patch {res.kind} {namespace}/{name}",
                body=patch,
                content_type=MERGE_CONTENT_TYPE,
            ),
        )

    async def create(self, res: Resource, obj: Obj, *, fenced: bool = True) -> Obj:
        meta = obj["metadata"]
        if fenced:
            self._fenced(f"create {res.kind} {meta.get('namespace', '')}/{meta['name']}")
        return cast(
            Obj,
            await self._call(
                "POST",
                res.path(meta.get("namespace")),
                f"create {res.kind} {meta.get('namespace', '')}/{meta['name']}",
                body=obj,
            ),
        )

    async def replace(self, res: Resource, obj: Obj, *, fenced: bool = True) -> Obj:
        """PUT: the whole object, refused (409) unless it is still at the resourceVersion in
        its metadata."""
        meta = obj["metadata"]
        what = f"update {res.kind} {meta.get('namespace', '')}/{meta['name']}"
        if fenced:
            self._fenced(what)
        return cast(
            Obj,
            await self._call("PUT", res.path(meta.get("namespace"), meta["name"]), what, body=obj),
        )

    async def delete(
        self, res: Resource, name: str, namespace: str | None = None, uid: str | None = None
    ) -> bool:
        """Delete; False if it was already gone. ``uid`` guards against deleting a newer
        object of the same name."""
        self._fenced(f"delete {res.kind} {namespace}/{name}")
        body: Obj | None = {"preconditions": {"uid": uid}} if uid else None
        try:
            await self._call(
                "DELETE",
                res.path(namespace, name),
                f"delete {res.kind} {namespace}/{name}",
                body=body,
            )
        except NotFound:
            return False
        except KubeError as e:
            if "Precondition failed" in str(e) or "UID in precondition" in str(e):
                return False
            raise
        return True
