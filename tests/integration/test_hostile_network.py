"""Network abuse against a real `neuronode serve`: slowloris, oversized PDUs, TLS, start-up.

Each test fails on a node whose accepted sockets have no timeout, that buffers whatever PDU
length a peer declares, that answers a bind failure with a traceback, or has no inbound TLS.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, pydicom_file
from tests.integration.conftest import NodeProc

pytestmark = pytest.mark.integration

TIMEOUT_S = 2.0
# A connection that stalls before its association request holds a slot for at most the larger
# of the two timeouts (acse_timeout_s bounds negotiation, network_timeout_s each PDU).
HOSTILE = {
    "node": {"network_timeout_s": TIMEOUT_S, "acse_timeout_s": TIMEOUT_S, "max_associations": 3}
}


def _storescu(tool: str, node: NodeProc, *opts: str, timeout: float = 30) -> bool:
    out = subprocess.run(
        [
            tool,
            "-nh",
            *opts,
            "-aet",
            "STORESCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            str(pydicom_file("MR_small.dcm")),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.returncode == 0


def _stored(node: NodeProc) -> int:
    return int(node.query("SELECT COUNT(*) FROM instances")[0][0])


def test_slowloris_connections_do_not_lock_out_a_sender(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str]
) -> None:
    node = node_factory(**HOSTILE)
    node.start()
    tool = dcmtk("storescu")
    # More stalled connections than association slots: 8 bytes each, then silence.
    stalled = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(b"\x01\x00\x00\x00\x10\x00\x00\x01")
        stalled.append(s)
    started = time.monotonic()
    try:
        stored = False
        while time.monotonic() - started < TIMEOUT_S + 8:
            if _storescu(tool, node):
                stored = True
                break
            time.sleep(0.3)
        assert stored, node.logs()[-3000:]
        assert time.monotonic() - started < TIMEOUT_S + 8
        assert _stored(node) == 1
        # The node closed the stalled connections itself.
        for s in stalled:
            s.settimeout(5)
            with contextlib.suppress(OSError):
                assert s.recv(100) == b""
    finally:
        for s in stalled:
            s.close()


def test_a_byte_every_second_does_not_keep_a_pdu_open(
    node_factory: Callable[..., NodeProc],
) -> None:
    node = node_factory(**HOSTILE)
    node.start()
    s = socket.create_connection(("127.0.0.1", node.port))
    started = time.monotonic()
    closed_after: float | None = None
    try:
        for byte in b"\x01\x00\x00\x00\x10\x00" * 4:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            s.settimeout(0.9)
            try:
                if s.recv(100) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
    finally:
        s.close()
    assert closed_after is not None, "the node kept a trickling PDU open"
    assert closed_after < TIMEOUT_S + 3
    assert "pdu_refused" in node.logs()


def test_oversized_pdu_is_aborted_from_its_header(node_factory: Callable[..., NodeProc]) -> None:
    node = node_factory(node={"max_pdu_bytes": 65536})
    node.start()
    s = socket.create_connection(("127.0.0.1", node.port))
    s.settimeout(5)
    try:
        # A P-DATA-TF declaring 256 MiB: aborted before any body byte is sent.
        s.sendall(struct.pack(">BBL", 0x04, 0, 256 * 1024 * 1024))
        answer = s.recv(100)
    finally:
        s.close()
    assert answer[:1] == b"\x07", answer  # A-ABORT
    node.wait_for(lambda: "declared PDU length over the limit" in node.logs(), timeout_s=5)
    # Still serving.
    with socket.create_connection(("127.0.0.1", node.port), timeout=2):
        pass


def _serve_once(node: NodeProc) -> subprocess.CompletedProcess[str]:
    node.write_rules()
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--rules", str(node.rules_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"node": {"bind_address": "192.0.2.7"}}, "node.bind_address"),
        ({"storage": {"spool_dir": "/proc/neuronode-spool"}}, "storage.spool_dir"),
        ("busy", "node.port"),
    ],
)
def test_start_up_failures_are_one_line_naming_the_key(
    node_factory: Callable[..., NodeProc], settings: dict[str, object] | str, key: str
) -> None:
    node = node_factory()
    busy: socket.socket | None = None
    if settings == "busy":
        busy = socket.socket()
        busy.bind(("127.0.0.1", node.port))
        busy.listen()
    else:
        assert isinstance(settings, dict)
        for section, values in settings.items():
            assert isinstance(values, dict)
            node.settings.setdefault(section, {}).update(values)
    try:
        out = _serve_once(node)
    finally:
        if busy is not None:
            busy.close()
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("neuronode serve:")]
    assert len(errors) == 1, out.stderr
    assert key in errors[0]


# --- inbound TLS -------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made now."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=neuronode test CA",
        cwd=d,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


def test_tls_listener_with_client_certificates(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str], pki: Path
) -> None:
    tls = {
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server.key"),
        "ca_file": str(pki / "ca.pem"),
    }
    node = node_factory(node={"tls": tls, "network_timeout_s": 5})
    node.start()
    tool = dcmtk("storescu")
    server_ca = ("+tla", "+cf", str(pki / "ca.pem"))
    with_cert = (
        "+tls",
        str(pki / "client.key"),
        str(pki / "client.pem"),
        "+cf",
        str(pki / "ca.pem"),
    )
    assert _storescu(tool, node, *with_cert), node.logs()[-3000:]
    assert _stored(node) == 1
    # Without a client certificate, and in plain DICOM: refused; the node keeps serving.
    assert not _storescu(tool, node, *server_ca)
    assert not _storescu(tool, node)
    assert _storescu(tool, node, *with_cert)
    assert "TLS handshake failed" in node.logs()


def test_check_rejects_missing_tls_files(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "node:\n  tls:\n    cert_file: /nonexistent/server.pem\n    key_file: /nonexistent/k.pem\n"
        "destinations:\n  - kind: dicom\n    name: pacs\n    ae_title: PACS\n    host: 127.0.0.1\n"
        "    port: 104\n    tls: true\n    tls_ca_file: /nonexistent/ca.pem\n",
        encoding="utf-8",
    )
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "check", str(rules)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    for key in ("node.tls.cert_file", "node.tls.key_file", "destinations.0.tls_ca_file"):
        assert key in out.stdout, out.stdout
