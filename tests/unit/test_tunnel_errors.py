"""The one-phrase reasons the gateway puts in logs and RST frames for failed connects."""

from meshlink.tunnel.gateway import _error_reason


def test_connect_error_reasons_name_timeouts_and_socket_errors() -> None:
    assert _error_reason(TimeoutError()) == "timed out"
    assert _error_reason(ConnectionRefusedError(111, "Connection refused")) == "Connection refused"
    assert _error_reason(OSError("no strerror")) == "no strerror"
