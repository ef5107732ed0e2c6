"""A real Orthanc (the Debian package) on free loopback ports, as the PACS of the tests.

Import the fixture into a test module (``from tests.integration.orthanc import orthanc``) or
list this module in ``pytest_plugins``. ``OrthancServer`` (from node/orthanc.py, which the demo
uses too) can also be used directly, e.g. to stop and restart the PACS on the same ports for an
outage test.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from node.lab.orthanc import (
    ACCEPTED_SOP_CLASSES_SINCE,
    DICOMWEB_PLUGIN,
    NODE_AET,
    ORTHANC_AET,
    ORTHANC_BINARY,
    START_TIMEOUT_S,
    OrthancServer,
    free_port,
    orthanc_binary,
    orthanc_version,
)
from tests.conftest import system_tool

__all__ = [
    "ACCEPTED_SOP_CLASSES_SINCE",
    "DICOMWEB_PLUGIN",
    "NODE_AET",
    "ORTHANC_AET",
    "ORTHANC_BINARY",
    "START_TIMEOUT_S",
    "OrthancServer",
    "make_test_pki",
    "orthanc",
    "orthanc_binary",
    "orthanc_factory",
    "orthanc_version",
]


def make_test_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA with a server (127.0.0.1) and a client certificate, via openssl."""
    openssl = system_tool("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in ("ca.crt", "ca.key")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=neuronode test CA",
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for role in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{role}.key",
            "-out",
            f"{role}.csr",
            "-subj",
            f"/CN=neuronode test {role}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{role}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{role}.crt",
            "-days",
            "2",
            "-extfile",
            str(ext),
        )
        files[f"{role}.crt"] = folder / f"{role}.crt"
        files[f"{role}.key"] = folder / f"{role}.key"
    return files


@pytest.fixture
def orthanc_factory() -> Iterator[Any]:
    """Start Orthancs with chosen options; every one is stopped at teardown."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    servers: list[OrthancServer] = []
    dirs: list[Path] = []

    def make(
        *,
        node_port: int | None = None,
        accepted_sop_classes: Sequence[str] | None = None,
        lua_script: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> OrthancServer:
        workdir = Path(tempfile.mkdtemp(prefix="orthanc-"))
        dirs.append(workdir)
        try:
            server = OrthancServer(
                workdir,
                node_port=node_port or free_port(),
                accepted_sop_classes=accepted_sop_classes,
                lua_script=lua_script,
                tls=tls,
            )
        except NotImplementedError as exc:
            pytest.skip(str(exc))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def orthanc(orthanc_factory: Any) -> OrthancServer:
    """A running Orthanc accepting every storage class, with DICOMweb at /dicom-web."""
    server: OrthancServer = orthanc_factory()
    return server
