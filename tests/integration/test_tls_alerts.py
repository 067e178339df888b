"""TLS refusals tell the client why: `openssl s_client` against a real `meshlink run`
process reads the alert OpenSSL sends (protocol_version to a TLS 1.2 client on the
gateway and grant ports, certificate_required to a link client without a certificate),
not "unexpected eof"."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.sites import SiteProc

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteProc]:
    a = SiteProc("a", tmp_path_factory.mktemp("tls")).start()
    try:
        yield a
    finally:
        a.stop()


def s_client(port: int, *args: str) -> str:
    """What openssl s_client prints; stdin is empty, -ign_eof keeps it reading until the
    server closes (a TLS 1.3 server refuses a client certificate after the handshake)."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode != 0, out.stdout
    return out.stdout + out.stderr


@pytest.mark.parametrize("port", ["gateway", "grant"])
def test_tls12_client_reads_protocol_version_alert(site: SiteProc, port: str) -> None:
    text = s_client(site.ports[port], "-tls1_2")
    assert "alert protocol version" in text, text
    assert "unexpected eof" not in text


def test_link_client_without_certificate_reads_certificate_required(site: SiteProc) -> None:
    text = s_client(site.ports["gateway"], "-tls1_3")
    assert "alert certificate required" in text, text
    assert "unexpected eof" not in text
    log = (site.dir / "meshlink.log").read_text()
    assert "refused a link: TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
