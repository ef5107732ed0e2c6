"""deploy/: what can be checked without a Docker engine or systemd as PID 1.

Each artefact is read into a list of problems by one function (`dockerfile_problems`,
`compose_problems`, `unit_problems`); the shipped files must give none, and a mutated copy of
each (a misspelt key, a lost pin, a port that no longer matches) must give the problem, so every
check is shown able to fail. Where a real tool exists (systemd-analyze, docker-compose,
shellcheck, Orthanc) the files also go through it.

Longer than 500 lines on purpose: the artefacts are checked against each other (the compose
rules against the Dockerfile, Orthanc's config and the Lua script; the unit against the rules
install.sh writes), so their checkers share one file and one set of fixtures.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from node.config import Rules, check_bundles_exist, validate_rules_text
from node.errors import StoreStatus
from node.ingest.spool import Spool
from node.lab.orthanc import free_port, orthanc_binary
from node.web.server import HTTP_PORT_ENV, WebServer

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_RULES = DEPLOY / "rules.compose.yaml"
ORTHANC_JSON = DEPLOY / "orthanc" / "orthanc.json"
ORTHANC_LUA = DEPLOY / "orthanc" / "autoforward.lua"
UNIT = DEPLOY / "neuronode.service"
INSTALL = DEPLOY / "install.sh"
DEFAULT_RULES = REPO / "routing_rules" / "default.yaml"

TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VENV_NEURONODE = "/opt/neuronode/venv/bin/neuronode"
INSTALLED_RULES = "/etc/neuronode/rules.yaml"
PRIVILEGED_PORT_LIMIT = 1024
MAX_EXPOSURE = 2.0  # systemd-analyze security: below 2 is "OK"; an unhardened unit scores 9+
SYSTEM_BIN = "/usr/bin:/usr/local/bin:/bin:/usr/sbin"


def system_tool(name: str) -> str | None:
    """A system binary, ignoring the venv's bin/."""
    return shutil.which(name, path=SYSTEM_BIN)


def rules_from_text(text: str) -> Rules:
    """Validate rule-file text with node.config; fail the test with every problem."""
    rules, problems = validate_rules_text(text)
    assert rules is not None, "\n".join(p.render("rules") for p in problems)
    return rules


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> tuple[Instruction, ...]:
    """Instructions in order; comments and the `# syntax=` directive are left out."""
    out: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword=keyword.upper(), args=args.strip(), line=start))
    return tuple(out)


def dockerfile_env(instructions: tuple[Instruction, ...]) -> dict[str, str]:
    """The ENV key=value pairs (the form this Dockerfile uses)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if sep:
                    env[key] = value
    return env


def healthcheck_command(instructions: tuple[Instruction, ...]) -> list[str]:
    """The exec-form command of HEALTHCHECK CMD [...]."""
    for ins in instructions:
        if ins.keyword == "HEALTHCHECK":
            _, sep, cmd = ins.args.partition("CMD ")
            assert sep, "HEALTHCHECK without CMD"
            parsed = json.loads(cmd)
            assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
            return [str(p) for p in parsed]
    raise AssertionError("no HEALTHCHECK")


def dockerfile_problems(text: str, rules: Rules) -> list[str]:
    """Everything the brief asks of deploy/Dockerfile, against the compose rule file."""
    problems: list[str] = []
    ins = parse_dockerfile(text)
    froms = [i.args for i in ins if i.keyword == "FROM"]
    if froms[-1:] != ["python:3.11-slim"]:
        problems.append(f"final stage is not python:3.11-slim: {froms}")
    pip_runs = [i for i in ins if i.keyword == "RUN" and "pip install" in i.args]
    installs = [
        part.strip()
        for run in pip_runs
        for part in re.split(r"&&|;", run.args)
        if "pip install" in part
    ]
    if not installs or TORCH_PIN not in installs[0] or TORCH_CPU_INDEX not in installs[0]:
        problems.append(f"the first pip install is not {TORCH_PIN} from {TORCH_CPU_INDEX}")
    for cmd in installs:
        if re.search(r"\btorch\b", cmd) and TORCH_PIN not in cmd:
            problems.append(f"torch installed without the pin: {cmd}")
        if "[lab]" in cmd or "[lab," in cmd:
            problems.append(f"the [lab] extra is installed: {cmd}")
    if len(installs) < 2:
        problems.append("the package itself is never pip-installed")
    copies = {i.args.split()[-1].rstrip("/"): i.args for i in ins if i.keyword == "COPY"}
    if str(rules.models_dir) not in copies or "models/" not in copies[str(rules.models_dir)]:
        problems.append(f"models/ is not copied to models_dir {rules.models_dir}")
    if not any("routing_rules/" in c for c in copies.values()):
        problems.append("routing_rules/ is not copied")
    users = [i.args for i in ins if i.keyword == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append(f"the image runs as root (USER {users})")
    elif not any("useradd" in i.args and users[-1] in i.args for i in ins if i.keyword == "RUN"):
        problems.append(f"USER {users[-1]} is never created")
    volumes = " ".join(i.args for i in ins if i.keyword == "VOLUME")
    if str(rules.storage.spool_dir) not in volumes:
        problems.append(f"the spool {rules.storage.spool_dir} is not a VOLUME ({volumes})")
    exposed = {p for i in ins if i.keyword == "EXPOSE" for p in i.args.split()}
    http_port = dockerfile_env(ins).get(HTTP_PORT_ENV)
    if http_port is None:
        problems.append(f"ENV {HTTP_PORT_ENV} is not set (no /healthz without it)")
    for port in (str(rules.node.port), http_port):
        if port is not None and port not in exposed:
            problems.append(f"port {port} is not EXPOSEd ({sorted(exposed)})")
    health = [i.args for i in ins if i.keyword == "HEALTHCHECK"]
    if len(health) != 1 or "/healthz" not in health[0] or "urllib" not in health[0]:
        problems.append(f"no HEALTHCHECK on /healthz with urllib: {health}")
    elif "curl" in health[0] or "wget" in health[0]:
        problems.append("the HEALTHCHECK needs curl or wget, which the slim image lacks")
    return problems


@pytest.fixture(scope="module")
def compose_rules() -> Rules:
    return rules_from_text(COMPOSE_RULES.read_text())


def test_dockerfile_meets_the_brief(compose_rules: Rules) -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(), compose_rules) == []


def test_dockerfile_torch_pin_is_the_packages() -> None:
    """The image's torch pin is pyproject's, so the package install finds torch already met."""
    assert f'"{TORCH_PIN}"' in (REPO / "pyproject.toml").read_text()
    assert TORCH_PIN in (REPO / "scripts" / "setup.sh").read_text()


DOCKERFILE_MUTATIONS = {
    "base": (("python:3.11-slim", "python:3.12"), "python:3.11-slim"),
    "unpinned torch": (
        (
            "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0",
            "pip install torch",
        ),
        "first pip install",
    ),
    "cuda torch": ((f" {TORCH_CPU_INDEX}", " https://pypi.org/simple"), "first pip install"),
    "lab extra": (("pip install /src", "pip install '/src[lab]'"), "[lab]"),
    "root": (("USER neuronode", "USER root"), "runs as root"),
    "no user": (("USER neuronode", "USER nobody2"), "never created"),
    "spool": (('VOLUME ["/var/lib/neuronode/spool"]', 'VOLUME ["/data"]'), "not a VOLUME"),
    "dicom port": (("EXPOSE 11112 8080", "EXPOSE 104 8080"), "11112 is not EXPOSEd"),
    "http port": (("EXPOSE 11112 8080", "EXPOSE 11112"), "8080 is not EXPOSEd"),
    "models": (("COPY models/ /opt/neuronode/models/", "COPY models/ /models/"), "models_dir"),
    "healthz": (("/healthz", "/health"), "HEALTHCHECK"),
}


@pytest.mark.parametrize("name", sorted(DOCKERFILE_MUTATIONS))
def test_dockerfile_check_catches(name: str, compose_rules: Rules) -> None:
    (old, new), expected = DOCKERFILE_MUTATIONS[name]
    text = DOCKERFILE.read_text()
    assert old in text, f"mutation {name!r} no longer applies: {old!r} not in the Dockerfile"
    problems = dockerfile_problems(text.replace(old, new), compose_rules)
    assert any(expected in p for p in problems), problems


def _serve_healthz(tmp_path: Path) -> tuple[WebServer, Spool]:
    spool = Spool(tmp_path / "spool", min_free_disk_mb=0)
    web = WebServer(spool, port=free_port(), active_associations=lambda: 0)
    web.start()
    return web, spool


def _run_probe(cmd: list[str], env: dict[str, str]) -> int:
    exe = sys.executable if cmd[0] == "python" else cmd[0]
    return subprocess.run(
        [exe, *cmd[1:]], env={**os.environ, **env}, capture_output=True, timeout=30, check=False
    ).returncode


def test_dockerfile_healthcheck_probes_a_real_node_web_server(tmp_path: Path) -> None:
    """The HEALTHCHECK command, run as written, passes against /healthz and fails without it."""
    cmd = healthcheck_command(parse_dockerfile(DOCKERFILE.read_text()))
    web, spool = _serve_healthz(tmp_path)
    port = str(web.port)
    try:
        assert _run_probe(cmd, {HTTP_PORT_ENV: port}) == 0
    finally:
        web.stop()
        spool.index.close()
    assert _run_probe(cmd, {HTTP_PORT_ENV: port}) != 0


def test_dockerignore_keeps_the_venv_out() -> None:
    """The build context is the repository: its .venv and .git must not be sent."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[next(i for i, s in enumerate(ignore) if not s.startswith("#"))] == "*"
    for needed in ("!pyproject.toml", "!README.md", "!node/", "!models/", "!routing_rules/"):
        assert needed in ignore


# --- compose ------------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def compose_problems(
    compose: dict[str, Any], rules: Rules, orthanc: dict[str, Any], lua: str
) -> list[str]:
    """The node and Orthanc wired to each other: ports, AE titles, addresses, volumes, health."""
    problems: list[str] = []
    services = compose.get("services", {})
    node, pacs = services.get("node"), services.get("orthanc")
    if not isinstance(node, dict) or not isinstance(pacs, dict):
        return [f"services node and orthanc expected, got {sorted(services)}"]
    for name, svc in (("node", node), ("orthanc", pacs)):
        test = svc.get("healthcheck", {}).get("test")
        if not test or test[0] not in {"CMD", "CMD-SHELL"}:
            problems.append(f"{name} has no healthcheck test")
    if node.get("build", {}).get("dockerfile") != "deploy/Dockerfile":
        problems.append("node is not built from deploy/Dockerfile")
    if "orthanc" not in str(pacs.get("image", "")):
        problems.append(f"orthanc image is {pacs.get('image')}")
    # The node's port in compose is its rule file's; Orthanc's modality entry names it too.
    exposed = {str(p).split("/")[0] for p in node.get("expose", [])}
    exposed |= {str(p).split(":")[-1].split("/")[0] for p in node.get("ports", [])}
    if str(rules.node.port) not in exposed:
        problems.append(f"node port {rules.node.port} (rule file) not in expose/ports {exposed}")
    if rules.node.bind_address != "0.0.0.0":
        problems.append(f"node binds {rules.node.bind_address}: unreachable from Orthanc")
    modalities = orthanc.get("DicomModalities", {})
    entry = modalities.get("neuronode")
    if entry != [rules.node.ae_title, "node", rules.node.port] and entry != [
        rules.node.ae_title,
        node.get("networks", {}).get("dicom", {}).get("ipv4_address"),
        rules.node.port,
    ]:
        problems.append(f"Orthanc's modality 'neuronode' {entry} is not the node's AE/host/port")
    # The node lets Orthanc in (by AE title and fixed address) and sends results back to it.
    orthanc_ip = pacs.get("networks", {}).get("dicom", {}).get("ipv4_address")
    callers = {(c.ae_title, c.host) for c in rules.node.allowed_callers}
    if (orthanc.get("DicomAet"), orthanc_ip) not in callers:
        problems.append(f"({orthanc.get('DicomAet')}, {orthanc_ip}) not in allowed_callers")
    subnets = compose.get("networks", {}).get("dicom", {}).get("ipam", {}).get("config", [])
    if orthanc_ip is None or not any(
        ip_address(orthanc_ip) in ip_network(s["subnet"]) for s in subnets
    ):
        problems.append(f"Orthanc's address {orthanc_ip} is not in the 'dicom' subnet")
    dests = [
        d
        for d in rules.destinations
        if d.kind == "dicom"
        and d.ae_title == orthanc.get("DicomAet")
        and d.host == "orthanc"
        and d.port == orthanc.get("DicomPort")
    ]
    if not dests:
        problems.append("no destination is Orthanc's service name, DicomAet and DicomPort")
    # Storage: the spool is a named volume at the rule file's spool_dir; Orthanc's db too.
    volumes = compose.get("volumes", {})
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in node.get("volumes", [])}
    if mounts.get(str(rules.storage.spool_dir)) not in volumes:
        problems.append(f"spool_dir {rules.storage.spool_dir} is not a named volume")
    if mounts.get(INSTALLED_RULES) != "./rules.compose.yaml":
        problems.append(f"rules.compose.yaml is not mounted at {INSTALLED_RULES}")
    pacs_mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in pacs.get("volumes", [])}
    if pacs_mounts.get(orthanc.get("StorageDirectory", "")) not in volumes:
        problems.append("Orthanc's StorageDirectory is not a named volume")
    scripts = orthanc.get("LuaScripts", [])
    if not scripts or any(s not in pacs_mounts for s in scripts):
        problems.append(f"Orthanc's LuaScripts {scripts} are not mounted")
    http_env = str(node.get("environment", {}).get(HTTP_PORT_ENV, ""))
    if not http_env.isdigit():
        problems.append(f"node has no {HTTP_PORT_ENV}: /healthz would not be served")
    # The Lua script forwards to the modality and skips what the node itself sends.
    if f"'{next(iter(modalities), '')}'" not in lua or "SendToModality" not in lua:
        problems.append("the Lua script does not send to Orthanc's 'neuronode' modality")
    if f"'{rules.node.ae_title}'" not in lua or "RemoteAet" not in lua:
        problems.append("the Lua script does not skip what the node sends back (a loop)")
    return problems


@pytest.fixture
def compose_parts() -> tuple[dict[str, Any], dict[str, Any], str]:
    orthanc = json.loads(ORTHANC_JSON.read_text())
    assert isinstance(orthanc, dict)
    return load_yaml(COMPOSE), orthanc, ORTHANC_LUA.read_text()


def test_compose_wires_node_and_orthanc(
    compose_parts: tuple[dict[str, Any], dict[str, Any], str], compose_rules: Rules
) -> None:
    compose, orthanc, lua = compose_parts
    assert compose_problems(compose, compose_rules, orthanc, lua) == []


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for key in parents:
        node = node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value


COMPOSE_MUTATIONS: dict[str, tuple[str, str, Any, str]] = {
    # name: (which file, key path, new value or None to delete, expected problem)
    "no orthanc": ("compose", "services.orthanc", None, "services node and orthanc"),
    "no node healthcheck": ("compose", "services.node.healthcheck", None, "node has no health"),
    "no orthanc healthcheck": (
        "compose",
        "services.orthanc.healthcheck",
        None,
        "orthanc has no health",
    ),
    "node port": ("compose", "services.node.expose", ["104"], "not in expose/ports"),
    "orthanc moved": (
        "compose",
        "services.orthanc.networks.dicom.ipv4_address",
        "172.29.117.99",
        "not in allowed_callers",
    ),
    "spool not a volume": (
        "compose",
        "services.node.volumes",
        ["./rules.compose.yaml:/etc/neuronode/rules.yaml:ro"],
        "spool_dir",
    ),
    "modality aet": (
        "orthanc",
        "DicomModalities.neuronode",
        ["NEURONODE2", "node", 11112],
        "modality 'neuronode'",
    ),
    "modality port": (
        "orthanc",
        "DicomModalities.neuronode",
        ["NEURONODE", "node", 104],
        "modality 'neuronode'",
    ),
    "orthanc aet": ("orthanc", "DicomAet", "PACS", "allowed_callers"),
    "orthanc dicom port": ("orthanc", "DicomPort", 104, "no destination"),
    "lua not mounted": ("orthanc", "LuaScripts", ["/etc/orthanc/other.lua"], "LuaScripts"),
}


@pytest.mark.parametrize("name", sorted(COMPOSE_MUTATIONS))
def test_compose_check_catches(
    name: str,
    compose_parts: tuple[dict[str, Any], dict[str, Any], str],
    compose_rules: Rules,
) -> None:
    compose, orthanc, lua = compose_parts
    which, path, value, expected = COMPOSE_MUTATIONS[name]
    _set(compose if which == "compose" else orthanc, path, value)
    problems = compose_problems(compose, compose_rules, orthanc, lua)
    assert any(expected in p for p in problems), problems


def test_compose_check_catches_a_lua_script_that_would_loop(
    compose_parts: tuple[dict[str, Any], dict[str, Any], str], compose_rules: Rules
) -> None:
    compose, orthanc, lua = compose_parts
    looping = re.sub(r"(?s)  if origin.*?end\n", "", lua, count=1)
    assert looping != lua
    problems = compose_problems(compose, compose_rules, orthanc, looping)
    assert any("loop" in p for p in problems), problems


def test_compose_node_healthcheck_is_the_images() -> None:
    compose = load_yaml(COMPOSE)["services"]["node"]
    image = healthcheck_command(parse_dockerfile(DOCKERFILE.read_text()))
    assert compose["healthcheck"]["test"] == ["CMD", *image]
    assert str(compose["environment"][HTTP_PORT_ENV]) == dockerfile_env(
        parse_dockerfile(DOCKERFILE.read_text())
    ).get(HTTP_PORT_ENV)


def test_compose_rules_validate_and_name_existing_bundles(compose_rules: Rules) -> None:
    """rules.compose.yaml passes node.config; its bundles (in the image) are the repo's."""
    in_repo = compose_rules.model_copy(update={"models_dir": REPO / "models"})
    assert check_bundles_exist(in_repo, DEPLOY) == ()
    assert compose_rules.node.accept_unknown_callers is False


def test_compose_rules_keep_the_shipped_tasks(compose_rules: Rules) -> None:
    """The fitted weights and temperatures are not copied: the compose rules inherit them."""
    shipped = rules_from_text(DEFAULT_RULES.read_text())
    assert compose_rules.tasks == shipped.tasks
    assert compose_rules.sequence == shipped.sequence
    assert "tasks" not in load_yaml(COMPOSE_RULES)


def test_compose_rules_typo_fails_validation() -> None:
    text = COMPOSE_RULES.read_text().replace("allowed_callers:", "allowed_caller:")
    rules, problems = validate_rules_text(text)
    assert rules is None and any("allowed_caller" in p.path for p in problems)


@pytest.fixture
def docker_compose() -> str:
    path = system_tool("docker-compose")
    if path is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return path


def _compose_config(docker_compose: str, compose_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker_compose, "-f", str(compose_file), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=compose_file.parent,
    )


def test_compose_file_passes_docker_compose_config(docker_compose: str) -> None:
    out = _compose_config(docker_compose, COMPOSE)
    assert out.returncode == 0, out.stderr


def test_docker_compose_config_rejects_a_misspelt_key(docker_compose: str, tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    good = tmp_path / "good.yaml"
    good.write_text(COMPOSE.read_text())
    assert _compose_config(docker_compose, good).returncode == 0  # the copy alone is fine
    out = _compose_config(docker_compose, bad)
    assert out.returncode != 0
    assert "healthchek" in out.stderr


# --- Orthanc, for real: the deploy config and the Lua script on the Debian Orthanc ---------------

ORTHANC_USER = ("demo", "demo")


def _mr_instance(modality: str = "MR") -> Dataset:
    """A minimal instance Orthanc will store (no patient data of interest)."""
    sop_class = MRImageStorage if modality == "MR" else SecondaryCaptureImageStorage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "DEPLOYTEST"
    ds.PatientName = "Deploy^Test"
    ds.Modality = modality
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(32)
    return ds


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeployOrthanc:
    http_port: int
    dicom_port: int
    scp_port: int
    received: list[tuple[str, str]]  # (SOPInstanceUID, calling AE) the fake node got

    def request(self, path: str, body: bytes | None = None, *, auth: bool = True) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body)
        if auth:
            token = base64.b64encode(":".join(ORTHANC_USER).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture
def deploy_orthanc(tmp_path: Path) -> Iterator[DeployOrthanc]:
    """Orthanc with deploy/orthanc/orthanc.json (only ports, storage and the node's address
    moved to loopback) and the unchanged Lua script; a pynetdicom SCP plays the node."""
    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.events import Event

    config = json.loads(ORTHANC_JSON.read_text())
    http_port, dicom_port, scp_port = free_port(), free_port(), free_port()
    aet, _, node_port = config["DicomModalities"]["neuronode"]
    config.update(
        StorageDirectory=str(tmp_path / "db"),
        IndexDirectory=str(tmp_path / "db"),
        HttpPort=http_port,
        HttpBindAddress="127.0.0.1",
        DicomPort=dicom_port,
        RemoteAccessAllowed=False,
        DicomModalities={"neuronode": [aet, "127.0.0.1", scp_port]},
        LuaScripts=[str(ORTHANC_LUA)],
    )
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    received: list[tuple[str, str]] = []

    def on_store(event: Event) -> int:
        received.append((str(event.dataset.SOPInstanceUID), event.assoc.requestor.ae_title))
        return int(StoreStatus.SUCCESS)

    scp_ae = AE(ae_title=aet)
    scp_ae.supported_contexts = StoragePresentationContexts
    scp = scp_ae.start_server(
        ("127.0.0.1", scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    log = (tmp_path / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), str(tmp_path / "orthanc.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    handle = DeployOrthanc(
        http_port=http_port, dicom_port=dicom_port, scp_port=scp_port, received=received
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "orthanc.log").read_text(errors="replace")
            try:
                handle.request("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "Orthanc did not answer"
                time.sleep(0.2)
        assert node_port == 11112
        yield handle
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        if scp is not None:
            scp.shutdown()


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.integration
def test_orthanc_forwards_mr_to_the_node_and_never_the_results(
    deploy_orthanc: DeployOrthanc,
) -> None:
    """The deploy config loads in a real Orthanc; an uploaded MR instance reaches the node;
    a non-MR object and anything the node itself stores are not sent back to it."""
    from pynetdicom import AE

    modality = deploy_orthanc.request("/modalities/neuronode/configuration")
    assert modality["AET"] == "NEURONODE"

    # What the node sends back arrives by C-STORE from AE title NEURONODE: not forwarded.
    from_node = _mr_instance("MR")
    ae = AE(ae_title="NEURONODE")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", deploy_orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established
    status = assoc.send_c_store(from_node)
    assoc.release()
    assert status.Status == StoreStatus.SUCCESS
    # A non-MR object uploaded through REST: not forwarded either.
    sc = _mr_instance("OT")
    deploy_orthanc.request("/instances", _encode(sc))
    # An MR instance uploaded through REST (a user pushing a study): forwarded.
    mr = _mr_instance("MR")
    deploy_orthanc.request("/instances", _encode(mr))

    assert _wait_for(lambda: len(deploy_orthanc.received) >= 1, 20), "nothing was forwarded"
    time.sleep(1.0)  # Lua callbacks run in order: the two earlier ones are done by now
    assert deploy_orthanc.received == [(str(mr.SOPInstanceUID), "ORTHANC")]
    with pytest.raises(urllib.error.HTTPError) as refused:
        deploy_orthanc.request("/system", auth=False)
    assert refused.value.code == 401


@pytest.mark.integration
def test_orthanc_healthcheck_command_from_compose(deploy_orthanc: DeployOrthanc) -> None:
    """compose's Orthanc probe (bash /dev/tcp, no curl) passes on a live Orthanc, fails off it."""
    test = load_yaml(COMPOSE)["services"]["orthanc"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    script = test[3]
    assert "/8042" in script
    live = script.replace("/8042", f"/{deploy_orthanc.http_port}")
    dead = script.replace("/8042", f"/{free_port()}")
    wrong_password = script.replace("ZGVtbzpkZW1v", base64.b64encode(b"demo:nope").decode())

    def run(script: str) -> int:
        return subprocess.run(["bash", "-c", script], timeout=30, check=False).returncode

    assert run(live) == 0
    assert run(dead) != 0
    assert run(wrong_password) != 0


# --- systemd unit -------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value given (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def unit_problems(text: str, installed_rules: Rules) -> list[str]:
    """The hardening the brief asks for, against the rule file install.sh writes."""
    unit = parse_unit(text)
    problems: list[str] = []

    def one(key: str) -> str | None:
        values = unit.get(f"Service.{key}")
        return values[-1] if values else None

    expected = {
        "User": "neuronode",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "Restart": "on-failure",
        "ExecStart": f"{VENV_NEURONODE} serve --rules {INSTALLED_RULES}",
        "ReadWritePaths": str(installed_rules.storage.spool_dir),
    }
    for key, value in expected.items():
        if one(key) != value:
            problems.append(f"{key}={one(key)}, expected {value}")
    caps = one("CapabilityBoundingSet")
    needs_bind = installed_rules.node.port < PRIVILEGED_PORT_LIMIT
    if caps is None:
        problems.append("CapabilityBoundingSet is not set")
    elif not needs_bind and caps != "":
        problems.append(f"CapabilityBoundingSet={caps} though port {installed_rules.node.port}")
    elif needs_bind and caps != "CAP_NET_BIND_SERVICE":
        problems.append(f"port {installed_rules.node.port} needs CAP_NET_BIND_SERVICE only")
    if len(unit.get("Service.ReadWritePaths", [])) != 1:
        problems.append("more than one ReadWritePaths= line: the spool must be the only one")
    if unit.get("Install.WantedBy") != ["multi-user.target"]:
        problems.append("not WantedBy=multi-user.target (enable would do nothing)")
    return problems


@pytest.fixture(scope="module")
def installed_rules() -> Rules:
    """The rule file install.sh would write to /etc/neuronode/rules.yaml."""
    out = subprocess.run(
        ["bash", str(INSTALL), "--print-rules"], capture_output=True, text=True, check=True
    )
    return rules_from_text(out.stdout)


def test_unit_is_hardened(installed_rules: Rules) -> None:
    assert unit_problems(UNIT.read_text(), installed_rules) == []


UNIT_MUTATIONS = {
    "protect system": (("ProtectSystem=strict", "ProtectSystem=full"), "ProtectSystem"),
    "writable": (
        ("ReadWritePaths=/var/lib/neuronode/spool", "ReadWritePaths=/var/lib/neuronode"),
        "ReadWritePaths",
    ),
    "second writable": (
        (
            "ReadWritePaths=/var/lib/neuronode/spool",
            "ReadWritePaths=/var/lib/neuronode/spool\nReadWritePaths=/tmp",
        ),
        "more than one",
    ),
    "capabilities": (("CapabilityBoundingSet=\n", "CapabilityBoundingSet=CAP_NET_RAW\n"), "Capab"),
    "root": (("User=neuronode", "User=root"), "User="),
    "restart": (("Restart=on-failure", "Restart=no"), "Restart="),
    "rules": (
        ("serve --rules /etc/neuronode/rules.yaml", "serve --rules /tmp/r.yaml"),
        "ExecStart",
    ),
}


@pytest.mark.parametrize("name", sorted(UNIT_MUTATIONS))
def test_unit_check_catches(name: str, installed_rules: Rules) -> None:
    (old, new), expected = UNIT_MUTATIONS[name]
    text = UNIT.read_text()
    assert old in text, f"mutation {name!r} no longer applies"
    problems = unit_problems(text.replace(old, new), installed_rules)
    assert any(expected in p for p in problems), problems


def test_unit_on_port_104_needs_exactly_net_bind(installed_rules: Rules) -> None:
    on_104 = installed_rules.model_copy(
        update={"node": installed_rules.node.model_copy(update={"port": 104})}
    )
    assert any("CAP_NET_BIND_SERVICE" in p for p in unit_problems(UNIT.read_text(), on_104))
    fixed = UNIT.read_text().replace(
        "CapabilityBoundingSet=\n", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
    )
    assert unit_problems(fixed, on_104) == []


@pytest.fixture
def systemd_analyze() -> str:
    path = system_tool("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {probe.stderr.strip()}")
    return path


def _verifiable_unit(tmp_path: Path, text: str) -> Path:
    """The unit with its venv path moved under tmp_path, where a stand-in executable exists
    (verify checks that ExecStart's program is there)."""
    fake = tmp_path / VENV_NEURONODE.lstrip("/")
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / "neuronode.service"
    unit.write_text(text.replace(VENV_NEURONODE, str(fake)))
    return unit


def _verify(systemd_analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    out = _verify(systemd_analyze, unit)
    # verify exits 0 on unknown keys and bad values: any line naming the unit is a failure.
    complaints = [line for line in out.stderr.splitlines() if unit.name in line]
    assert out.returncode == 0 and complaints == [], out.stderr


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("ProtectSystem=strict", "ProtectSystem=strictt", "protect system value"),
        ("NoNewPrivileges=yes", "NoNewPrivilege=yes", "Unknown key 'NoNewPrivilege'"),
        ("PrivateTmp=yes", "PrivateTemp=yes", "Unknown key 'PrivateTemp'"),
        ("Restart=on-failure", "Restart=on-fail", "on-fail"),
    ],
)
def test_systemd_analyze_verify_catches_a_typo(
    systemd_analyze: str, tmp_path: Path, old: str, new: str, complaint: str
) -> None:
    text = UNIT.read_text()
    assert old in text
    unit = _verifiable_unit(tmp_path, text.replace(old, new))
    out = _verify(systemd_analyze, unit)
    assert any(unit.name in line and complaint in line for line in out.stderr.splitlines()), (
        out.stderr
    )


def _exposure(systemd_analyze: str, unit: Path) -> float:
    out = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline is not available: {out.stderr[:200]}")
    return float(match.group(1))


def test_unit_exposure_is_low(systemd_analyze: str, tmp_path: Path) -> None:
    """systemd's own score of the sandbox: the shipped unit is OK, the bare unit is not."""
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    assert _exposure(systemd_analyze, unit) <= MAX_EXPOSURE
    bare = "\n".join(
        line
        for line in UNIT.read_text().splitlines()
        if line.split("=")[0] in {"[Unit]", "Description", "[Service]", "User", "ExecStart"}
    )
    assert _exposure(systemd_analyze, _verifiable_unit(tmp_path, bare)) > MAX_EXPOSURE


# --- install.sh ---------------------------------------------------------------------------------


def _install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_install_dry_run_under_a_prefix_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    out = _install("--dry-run", "--prefix", str(prefix))
    assert out.returncode == 0, out.stderr
    assert not prefix.exists()
    cmds = _commands(out.stdout)
    venv = f"{prefix}/opt/neuronode/venv"
    pips = [i for i, c in enumerate(cmds) if " -m pip install " in c]
    assert len(pips) == 2
    torch_cmd, package_cmd = cmds[pips[0]], cmds[pips[1]]
    assert torch_cmd.startswith(f"{venv}/bin/python -m pip install")
    assert torch_cmd.endswith(f"--index-url {TORCH_CPU_INDEX} {TORCH_PIN}")
    assert package_cmd.endswith(f" {REPO}")  # no [lab] extra
    assert any(c.startswith("python3 -m venv") or c.endswith(f"-m venv {venv}") for c in cmds)
    assert f"render_rules > {prefix}/etc/neuronode/rules.yaml" in cmds
    assert f"cp -R {REPO}/models {prefix}/opt/neuronode/models.new" in cmds
    assert any(c.endswith(f"{prefix}/var/lib/neuronode/spool") for c in cmds)
    assert (
        f"install -m 0644 {REPO}/deploy/neuronode.service "
        f"{prefix}/etc/systemd/system/neuronode.service"
    ) in cmds
    # A staging prefix never touches the host's users or systemd.
    assert not any(c.startswith(("useradd", "systemctl")) for c in cmds)


def test_install_dry_run_on_the_host_adds_user_and_enables_the_unit() -> None:
    out = _install("--dry-run")
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert "systemctl enable neuronode.service" in cmds
    assert cmds.index("systemctl daemon-reload") < cmds.index("systemctl enable neuronode.service")
    has_user = subprocess.run(["id", "-u", "neuronode"], capture_output=True, check=False)
    if has_user.returncode == 0:
        assert "user neuronode: exists" in out.stderr
    else:
        assert any(c.startswith("useradd --system") and c.endswith(" neuronode") for c in cmds)
    assert any("-o neuronode -g neuronode" in c and c.endswith("/spool") for c in cmds)


def test_install_second_run_keeps_venv_torch_and_the_sites_rules(tmp_path: Path) -> None:
    """Idempotent: what exists is kept; the site's edited rule file is never overwritten."""
    prefix = tmp_path / "root"
    python = prefix / "opt/neuronode/venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")  # answers 'torch 2.13.0 present'
    python.chmod(0o755)
    rules = prefix / "etc/neuronode/rules.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text("# edited by the site\n")
    out = _install("--dry-run", "--prefix", str(prefix))
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert not any(" -m venv " in c or TORCH_PIN in c for c in cmds)
    assert f"render_rules > {rules}.dist" in cmds
    assert "exists, kept" in out.stderr
    assert rules.read_text() == "# edited by the site\n"


def test_install_refuses_unknown_options() -> None:
    out = _install("--dryrun")
    assert out.returncode == 2 and "unknown option" in out.stderr


def test_installed_rules_fit_the_unit_and_keep_the_shipped_rest(installed_rules: Rules) -> None:
    """Only models_dir and spool_dir differ from routing_rules/default.yaml."""
    assert str(installed_rules.models_dir) == "/opt/neuronode/models"
    assert installed_rules.storage.spool_dir == Path("/var/lib/neuronode/spool")
    assert parse_unit(UNIT.read_text())["Service.ReadWritePaths"] == [
        str(installed_rules.storage.spool_dir)
    ]
    shipped = rules_from_text(DEFAULT_RULES.read_text())
    same = {"models_dir": shipped.models_dir, "storage": shipped.storage}
    assert installed_rules.model_copy(update=same) == shipped
    assert (
        check_bundles_exist(
            installed_rules.model_copy(update={"models_dir": REPO / "models"}), REPO
        )
        == ()
    )


@pytest.fixture
def shellcheck() -> str:
    path = system_tool("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    return path


def test_install_script_passes_shellcheck(shellcheck: str, tmp_path: Path) -> None:
    out = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout
    # And shellcheck here does catch a classic: an unquoted expansion.
    bad = tmp_path / "bad.sh"
    bad.write_text(
        INSTALL.read_text().replace('rm -rf "$PREFIX$MODELS_DIR"', "rm -rf $PREFIX$MODELS_DIR")
    )
    caught = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, check=False)
    assert caught.returncode != 0 and "SC2086" in caught.stdout
