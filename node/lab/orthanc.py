"""Run a throw-away Orthanc (the Debian package) on loopback: the PACS of the demo and the tests.

Orthanc gets a generated config in a work folder, free loopback ports, the node as a known
modality (so Orthanc can forward a study to it) and, when the plugin is installed, DICOMweb.
Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from node.errors import ConfigError, NodeError

ORTHANC_BINARY: Final = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN: Final = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET: Final = "ORTHANC"
NODE_AET: Final = "NEURONODE"
NODE_MODALITY: Final = "neuronode"  # the node's name in Orthanc's DicomModalities
START_TIMEOUT_S: Final = 30.0
# "AcceptedSopClasses" exists from Orthanc 1.12.5; older versions accept every storage class.
ACCEPTED_SOP_CLASSES_SINCE: Final = (1, 12, 5)
# System folders only: a virtualenv's bin/ may shadow dcmtk tools with pynetdicom's own.
SYSTEM_BIN: Final = "/usr/bin:/usr/local/bin:/bin:/usr/sbin"


class OrthancError(NodeError):
    """Orthanc is not installed, would not start, or its REST API refused a request."""


def system_tool(name: str) -> str | None:
    """Path of a system (Debian) binary, ignoring a virtualenv's bin/."""
    return shutil.which(name, path=SYSTEM_BIN)


def require_dcmtk(name: str) -> str:
    """Path of a dcmtk tool (storescu, echoscu, ...); ConfigError saying how to install it."""
    path = system_tool(name)
    if path is None:
        raise ConfigError(f"dcmtk's {name} is not installed (apt-get install dcmtk)")
    return path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> Path | None:
    """The Orthanc executable, if installed."""
    if ORTHANC_BINARY.is_file():
        return ORTHANC_BINARY
    found = system_tool("Orthanc")
    return Path(found) if found else None


def orthanc_version(binary: Path) -> tuple[int, ...]:
    """Orthanc's version as a tuple, e.g. (1, 10, 1)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    for token in (out.stdout or out.stderr).split():
        parts = token.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return (0,)


class OrthancServer:
    """One Orthanc process with a generated config in a work folder."""

    def __init__(
        self,
        workdir: Path,
        *,
        node_port: int,
        node_aet: str = NODE_AET,
        accepted_sop_classes: Sequence[str] | None = None,
        lua_script: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        dicomweb: bool = True,
    ) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
        self.binary = binary
        self.version = orthanc_version(binary)
        if accepted_sop_classes is not None and self.version < ACCEPTED_SOP_CLASSES_SINCE:
            raise NotImplementedError(
                f"Orthanc {'.'.join(map(str, self.version))} has no AcceptedSopClasses option"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.node_port = node_port
        self.aet = ORTHANC_AET
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        config: dict[str, Any] = {
            "Name": "neuronode-demo",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.http_port,
            "HttpBindAddress": "127.0.0.1",
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {NODE_MODALITY: [node_aet, "127.0.0.1", node_port]},
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
        with open(self.log_path, "ab") as log:  # the process keeps its own handle
            self._proc = subprocess.Popen(
                [str(self.binary), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited: {self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {START_TIMEOUT_S} s")

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
        """The last lines of Orthanc's own log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # --- REST ---------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource as bytes (e.g. /instances/<id>/file)."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            data: bytes = resp.read()
            return data

    def post(
        self, path: str, body: bytes | dict[str, Any] | list[Any], timeout_s: float = 60
    ) -> Any:
        """POST JSON (or raw bytes) and decode the JSON answer (None when empty)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
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

    def forward_study(self, study_uid: str, modality: str = NODE_MODALITY) -> None:
        """C-STORE every instance of a study to a known modality (REST /modalities/.../store)."""
        found = self.post(
            "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        if not found:
            raise OrthancError("the study is not in Orthanc")
        try:
            self.post(f"/modalities/{modality}/store", {"Resources": found, "Synchronous": True})
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"Orthanc could not forward the study: HTTP {exc.code}") from exc
