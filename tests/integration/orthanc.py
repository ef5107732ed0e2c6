"""A real Orthanc (the Debian package) on free loopback ports, as the PACS of the tests.

Import the fixture into a test module (``from tests.integration.orthanc import orthanc``) or
list this module in ``pytest_plugins``. ``OrthancServer`` can also be used directly, e.g. to
stop and restart the PACS on the same ports for an outage test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, system_tool

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
NODE_AET = "NEURONODE"
START_TIMEOUT_S = 30.0


def orthanc_binary() -> Path | None:
    """The Orthanc executable, if installed."""
    if ORTHANC_BINARY.is_file():
        return ORTHANC_BINARY
    found = system_tool("Orthanc")
    return Path(found) if found else None


def orthanc_version(binary: Path) -> tuple[int, ...]:
    """Orthanc's version as a tuple, e.g. (1, 10, 1)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).split()
    for token in first:
        parts = token.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return (0,)


# "AcceptedSopClasses" exists from Orthanc 1.12.5 (NEWS: limit the SOP classes accepted by the
# C-STORE SCP); older versions accept every storage class DCMTK knows.
ACCEPTED_SOP_CLASSES_SINCE = (1, 12, 5)


class OrthancServer:
    """One Orthanc process with a generated config in a temporary folder."""

    def __init__(
        self,
        workdir: Path,
        *,
        node_port: int,
        accepted_sop_classes: Sequence[str] | None = None,
        lua_script: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        dicomweb: bool = True,
    ) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
        self.binary = binary
        self.version = orthanc_version(binary)
        if accepted_sop_classes is not None and self.version < ACCEPTED_SOP_CLASSES_SINCE:
            raise NotImplementedError(
                f"Orthanc {'.'.join(map(str, self.version))} has no AcceptedSopClasses option"
            )
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.node_port = node_port
        self.aet = ORTHANC_AET
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        config: dict[str, Any] = {
            "Name": "neuronode-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"neuronode": [NODE_AET, "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": True,
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb and DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if accepted_sop_classes is not None:
            config["AcceptedSopClasses"] = list(accepted_sop_classes)
        if tls is not None:  # (certificate, private key, trusted client certificates/CA)
            config["DicomTlsEnabled"] = True
            config["DicomTlsCertificate"] = str(tls[0])
            config["DicomTlsPrivateKey"] = str(tls[1])
            config["DicomTlsTrustedCertificates"] = str(tls[2])
            config["DicomTlsRemoteCertificateRequired"] = True
        if lua_script is not None:  # e.g. a ReceivedInstanceFilter that refuses some objects
            lua_path = workdir / "filter.lua"
            lua_path.write_text(lua_script)
            config["LuaScripts"] = [str(lua_path)]
        self.config_path.write_text(json.dumps(config, indent=2))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        """Start Orthanc and wait until its REST API answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process keeps writing to it
        self._proc = subprocess.Popen(
            [str(self.binary), str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; the storage folder is kept for a restart."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same ports with the same storage."""
        self.stop()
        self.start()

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # --- REST ---------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            data: bytes = resp.read()
            return data

    def post(self, path: str, body: bytes | dict[str, Any] | list[Any]) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        result: list[str] = self.get("/instances")
        return result

    def tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's tags in Orthanc's simplified form."""
        result: dict[str, Any] = self.get(f"/instances/{instance_id}/tags?simplify")
        return result

    def by_sop_uid(self) -> dict[str, dict[str, Any]]:
        """Simplified tags of every stored instance, by SOP Instance UID."""
        out: dict[str, dict[str, Any]] = {}
        for iid in self.instances():
            tags = self.tags(iid)
            out[str(tags["SOPInstanceUID"])] = {"_id": iid, **tags}
        return out

    def upload(self, path: Path) -> Any:
        """Store a DICOM file through REST (POST /instances)."""
        return self.post("/instances", path.read_bytes())


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
