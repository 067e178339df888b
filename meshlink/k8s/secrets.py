"""The site's state in the API server: ``SecretStore``, the ``meshlink.store.Store`` of
Kubernetes mode (``kubernetes.state: secrets``).

Each document is one Secret of meshlink's namespace, ``meshlink-<doc>`` (meshlink-pki,
meshlink-tokens, meshlink-peers, meshlink-links), each file one data key. A write is a PUT
carrying the resourceVersion the document was read at (a POST for a new one): the API
server refuses it with 409 when another writer came first, which ``store.update`` turns
into a re-read and a retry. The RBAC of the manifests lets meshlink get, create and update
Secrets of these four names only, in its own namespace (and its admission policy refuses
a create of any other name); it never lists Secrets.

A long-running site keeps a cache of the four documents, refreshed by ``refresh`` (a
periodic job of the runtime, so that a token created or a link made through `kubectl
exec` on the other replica is seen within a second) and by its own writes; decisions read
past it (``fresh=True``). Every document read is also copied to the state directory
(``store.sync_dir``, keys 0600): TLS contexts load their certificates and keys from there.

Requests are synchronous (the CLI has no event loop, and the site's writes are few and
made from threads): ``SyncKube``, a small HTTPS client for the in-cluster service account
or a kubeconfig with a token or a client certificate, every request bounded in time.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from meshlink.config import KubernetesConfig
from meshlink.errors import ConfigError
from meshlink.store import DOCS, Doc, StoreConflict, StoreError, sync_dir

log = logging.getLogger(__name__)

SA_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SECRET_PREFIX: Final = "meshlink-"  # noqa: S105 - a name, not a password
STATE_LABEL: Final = "meshlink.io/state"


def secret_name(doc: str) -> str:
    return SECRET_PREFIX + doc


class SyncKube:
    """A blocking HTTPS client of one API server (JSON in, JSON out), thread-safe."""

    def __init__(
        self,
        server: str,
        context: ssl.SSLContext,
        *,
        token: str | None = None,
        token_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        url = urlsplit(server)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(f"the API server {server!r} is not an https:// URL")
        self.server = server
        self._host = url.hostname
        self._port = url.port or 443
        self._prefix = url.path.rstrip("/")
        self._context = context
        self._token = token
        self._token_file = token_file
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPSConnection | None = None

    @classmethod
    def from_config(cls, kube: KubernetesConfig) -> SyncKube:
        """In-cluster (the pod's service account) or ``kube.kubeconfig``."""
        if kube.kubeconfig is None:
            host, port = (
                os.environ.get("KUBERNETES_SERVICE_HOST"),
                os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
            )
            if not host:
                raise ConfigError(
                    "not running in a pod (KUBERNETES_SERVICE_HOST is unset): set "
                    "kubernetes.kubeconfig",
                    key="kubernetes.kubeconfig",
                )
            ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
            hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return cls(
                f"https://{hostport}",
                ctx,
                token_file=SA_DIR / "token",
                timeout=kube.request_timeout,
            )
        return _from_kubeconfig(kube)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body or None). Transport errors are StoreError."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        token = self._token
        if self._token_file is not None:
            try:
                token = self._token_file.read_text().strip()  # bound tokens rotate
            except OSError as e:
                raise StoreError(f"cannot read the service account token: {e.strerror}") from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with self._lock:
            for attempt in (0, 1):
                conn = self._connection()
                try:
                    conn.request(method, self._prefix + path, body=data, headers=headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                    break
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    self._conn = None
                    # A kept-alive connection the server closed: once more on a new one.
                    if attempt or isinstance(e, TimeoutError):
                        raise StoreError(
                            f"cannot reach the API server {self.server}: {e or type(e).__name__}"
                        ) from None
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, None

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(
                self._host, self._port, context=self._context, timeout=self.timeout
            )
        return self._conn


def _from_kubeconfig(kube: KubernetesConfig) -> SyncKube:
    assert kube.kubeconfig is not None
    where = str(kube.kubeconfig)
    try:
        data = yaml.safe_load(kube.kubeconfig.read_text())
    except OSError as e:
        raise ConfigError(
            f"cannot read {where}: {e.strerror}", key="kubernetes.kubeconfig"
        ) from None
    except yaml.YAMLError:
        raise ConfigError(f"{where} is not YAML", key="kubernetes.kubeconfig") from None

    def named(kind: str, name: object) -> dict[str, Any]:
        for item in (data or {}).get(kind) or []:
            if isinstance(item, dict) and item.get("name") == name:
                return dict(item.get(kind[:-1]) or {})
        raise ConfigError(f"{where}: no {kind[:-1]} named {name!r}", key="kubernetes.kubeconfig")

    ctx_name = kube.context or (data or {}).get("current-context")
    context = named("contexts", ctx_name)
    cluster, user = named("clusters", context.get("cluster")), named("users", context.get("user"))
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(
            f"{where}: user {context.get('user')!r} authenticates through a plugin, which "
            "meshlink's state store cannot run: use a token or a client certificate, or set "
            "kubernetes.state: files",
            key="kubernetes.kubeconfig",
        )
    base = Path(where).parent

    def blob(d: dict[str, Any], key: str) -> bytes | None:
        if d.get(f"{key}-data"):
            return base64.b64decode(str(d[f"{key}-data"]))
        if d.get(key):
            return (base / str(d[key])).read_bytes()
        return None

    ctx = ssl.create_default_context()
    if cluster.get("insecure-skip-tls-verify"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ca = blob(cluster, "certificate-authority")
    if ca is not None:
        ctx.load_verify_locations(cadata=ca.decode())
    cert, key = blob(user, "client-certificate"), blob(user, "client-key")
    if cert is not None and key is not None:
        # ssl loads a client certificate only from files: private ones, gone once loaded.
        with tempfile.TemporaryDirectory() as tmp:
            cpath, kpath = Path(tmp) / "c", Path(tmp) / "k"
            for p, b in ((cpath, cert), (kpath, key)):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(b)
            ctx.load_cert_chain(cpath, kpath)
    token_file = user.get("tokenFile")
    return SyncKube(
        str(cluster.get("server", "")),
        ctx,
        token=user.get("token"),
        token_file=base / token_file if token_file else None,
        timeout=kube.request_timeout,
    )


def _message(status: int, body: Any) -> str:
    msg = body.get("message") if isinstance(body, dict) else None
    return f"HTTP {status}" + (f": {msg}" if msg else "")


class SecretStore:
    """See the module docstring."""

    def __init__(self, client: SyncKube, namespace: str, root: Path) -> None:
        self.client = client
        self.namespace = namespace
        self.root = Path(root)
        self._cache: dict[str, Doc] = {}
        self._lock = threading.Lock()
        self.caching = False
        """Serve plain reads from the cache (a running site that ``refresh``-es it)."""

    def describe(self) -> str:
        return f"Secrets {SECRET_PREFIX}* in namespace {self.namespace}"

    def close(self) -> None:
        self.client.close()

    def _path(self, doc: str, *, collection: bool = False) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/secrets"
        return base if collection else f"{base}/{secret_name(doc)}"

    def read(self, doc: str, *, fresh: bool = False) -> Doc:
        if self.caching and not fresh:
            with self._lock:
                cached = self._cache.get(doc)
            if cached is not None:
                return cached
        status, body = self.client.request("GET", self._path(doc))
        if status == 404:
            return self._keep(doc, Doc())
        if status != 200 or not isinstance(body, dict):
            raise StoreError(f"cannot read Secret {secret_name(doc)}: {_message(status, body)}")
        return self._keep(doc, _doc_of(body))

    def write(self, doc: str, files: Mapping[str, bytes], base: Doc) -> Doc:
        meta: dict[str, Any] = {
            "name": secret_name(doc),
            "namespace": self.namespace,
            "labels": {
                "app.kubernetes.io/name": "meshlink",
                "app.kubernetes.io/part-of": "meshlink",
                STATE_LABEL: doc,
            },
        }
        if base.version:
            meta["resourceVersion"] = base.version
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in sorted(files.items())},
        }
        if base.version:
            status, answer = self.client.request("PUT", self._path(doc), body)
        else:
            status, answer = self.client.request("POST", self._path(doc, collection=True), body)
        if status in (404, 409):
            raise StoreConflict(f"Secret {secret_name(doc)} changed meanwhile")
        if status not in (200, 201) or not isinstance(answer, dict):
            raise StoreError(
                f"cannot write Secret {secret_name(doc)} in {self.namespace}: "
                f"{_message(status, answer)}"
            )
        return self._keep(doc, _doc_of(answer))

    def refresh(self) -> None:
        """Read every document again (a periodic job of a running site)."""
        for doc in DOCS:
            self.read(doc, fresh=True)

    def _keep(self, doc: str, value: Doc) -> Doc:
        with self._lock:
            old = self._cache.get(doc)
            # An older answer (a slow read racing a write) never replaces a newer one.
            if old is not None and old.version and value.version and _older(value, old):
                return old
            self._cache[doc] = value
            if old is None or old.files != value.files or not (self.root / doc).is_dir():
                sync_dir(self.root / doc, value.files)
        return value


def _older(a: Doc, b: Doc) -> bool:
    try:
        return int(a.version) < int(b.version)
    except ValueError:
        return False


def _doc_of(secret: dict[str, Any]) -> Doc:
    data = secret.get("data") or {}
    try:
        files = {str(k): base64.b64decode(v) for k, v in data.items()}
    except (ValueError, TypeError):
        raise StoreError(
            f"Secret {(secret.get('metadata') or {}).get('name')} holds undecodable data"
        ) from None
    return Doc(files, str((secret.get("metadata") or {}).get("resourceVersion", "")))
