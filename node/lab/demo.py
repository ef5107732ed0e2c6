"""`neuronode demo`: a synthetic study through a running node and back into a PACS, end to end.

It writes a synthetic brain-MR study (node/lab/synth), starts Orthanc as the PACS when it is
installed (else a small storage SCP of our own stands in for it), starts the node in this
process with a generated rule file (DIR/run/rules.yaml) whose destination is that PACS, sends
the study the way a hospital would (dcmtk storescu to Orthanc, then Orthanc forwards it to the
node), waits until the node has delivered its SR and heatmaps, prints the findings and where
the results went, and copies the delivered objects plus one heatmap PNG into DIR. Everything
listens on 127.0.0.1 only and is stopped at the end. NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from node import NOT_FOR_CLINICAL_USE
from node.errors import ConfigError, NodeError
from node.lab.orthanc import OrthancServer, free_port, orthanc_binary, system_tool
from node.log import configure, load_or_create_key, set_correlation_key, uid_key
from node.pipeline.audit import AuditRecord, read_audit

DEFAULT_SEED: Final = 20261123
DEFAULT_PHENOTYPE: Final = "gbm"
NODE_AET: Final = "NEURONODE"
SCU_AET: Final = "STORESCU"
PACS_AET: Final = "DEMOPACS"  # our own storage SCP when Orthanc is not installed
RESULT_TIMEOUT_S: Final = 240.0
REPO_MODELS: Final = Path(__file__).resolve().parents[2] / "models"

if TYPE_CHECKING:
    from node.cli.lab import DemoArgs


class DemoError(NodeError):
    """A step of the demo could not be done (the message says which and why)."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def models_dir() -> Path:
    """The shipped bundles: models/ beside the package (a source checkout), else ./models."""
    return REPO_MODELS if REPO_MODELS.is_dir() else Path.cwd() / "models"


def available_tasks(models: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The built-in tasks keeping only routes whose bundle loads; and what was left out, why."""
    from node.config import Rules
    from node.pipeline.models import loadable_tasks

    loadable, left_out = loadable_tasks(models)
    notes = [f"{r.task}: route {r.bundle} left out ({r.reason})" for r in left_out]
    notes += [
        f"task {name} disabled: none of its bundles is available"
        for name in Rules().tasks
        if name not in loadable
    ]
    tasks = {name: task.model_dump(mode="json") for name, task in loadable.items()}
    return tasks, tuple(notes)


# --- the PACS: Orthanc, or a storage SCP of our own -------------------------------------------


class LocalPacs:
    """A minimal storage SCP that writes every object it receives into a folder, as received."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aet = PACS_AET
        self.received: dict[str, Path] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=PACS_AET)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax)
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        if server is None:  # pragma: no cover - block=False always returns the server
            raise DemoError("the stand-in PACS did not start")
        self._server = server

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if not uid.replace(".", "").isdigit():
            return 0xC000
        path = self.folder / f"{uid}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self._lock:
            self.received[uid] = path
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """One result object that reached the PACS, and where it is there."""

    kind: str  # sr or sc
    sop_instance_uid: str
    where: str  # Orthanc instance id or a file path
    copy: Path  # our copy in the demo folder


# --- steps -------------------------------------------------------------------------------------


def write_study(folder: Path, seed: int, phenotype: str) -> tuple[str, int]:
    """A synthetic multi-contrast brain MR study; returns its Study UID and file count."""
    from node.lab.synth import write_studies

    manifest = write_studies(
        folder, studies=1, seed=seed, phenotypes=[phenotype], vendors=["siemens"]
    )
    study_uid = str(manifest.studies[0]["study_uid"])
    n_files = sum(1 for p in folder.rglob("*.dcm"))
    return study_uid, n_files


def write_rules(
    run: Path, *, node_port: int, destination: dict[str, Any], tasks: dict[str, Any]
) -> Path:
    """The rule file the demo node runs with (quiet period 1 s, fast retries)."""
    doc = {
        "version": 1,
        "node": {
            "ae_title": NODE_AET,
            "bind_address": "127.0.0.1",
            "port": node_port,
            "allowed_callers": [
                {"ae_title": SCU_AET, "host": "127.0.0.1"},
                {"ae_title": "ORTHANC", "host": "127.0.0.1"},
            ],
        },
        "storage": {"spool_dir": str(run / "spool"), "min_free_disk_mb": 64},
        "http": {"port": 0},  # any free loopback port: the demo never fights a running node
        "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.2},
        "processing": {"workers": 1, "lease_s": 300, "max_attempts": 2},
        "logging": {"format": "json", "level": "info"},
        "models_dir": str(models_dir()),
        "tasks": tasks,
        "outputs": {"structured_report": True, "heatmaps_per_series": 3},
        "destinations": [destination],
        "delivery": {"max_attempts": 20, "backoff_initial_s": 1, "backoff_max_s": 5},
    }
    path = run / "rules.yaml"
    path.write_text(
        "# Generated by `neuronode demo`. NOT FOR CLINICAL USE.\n"
        + yaml.safe_dump(doc, sort_keys=False),
        encoding="utf-8",
    )
    return path


def push(study_dir: Path, host: str, port: int, called_ae: str) -> str:
    """Send every file of the study like a scanner: dcmtk storescu, else a pynetdicom SCU."""
    storescu = system_tool("storescu")
    if storescu is not None:
        cmd = [storescu, "-aet", SCU_AET, "-aec", called_ae, "+sd", "+r", "-nh"]
        done = subprocess.run(
            [*cmd, host, str(port), str(study_dir)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise DemoError(f"storescu failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        return "dcmtk storescu"
    import pydicom
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=SCU_AET)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DemoError(f"cannot open an association to {called_ae} at {host}:{port}")
    try:
        for path in sorted(study_dir.rglob("*.dcm")):
            status = assoc.send_c_store(pydicom.dcmread(path))
            if not status or status.Status != 0x0000:
                raise DemoError(f"{path.name} was not stored")
    finally:
        assoc.release()
    return "pynetdicom SCU"


def wait_for_results(spool: Path, study_uid: str, timeout_s: float) -> AuditRecord:
    """Wait until the study's audit is written and every result object is delivered."""
    from node.deliver.outbox import OUTBOX_DB, Outbox
    from node.records import DeliveryState

    audit_file = spool / "results" / uid_key(study_uid) / "audit.json"
    deadline = time.monotonic() + timeout_s
    audit: AuditRecord | None = None
    while time.monotonic() < deadline:
        if audit is None and audit_file.is_file():
            audit = read_audit(audit_file)
            if audit.status == "failed":
                error = audit.error
                raise DemoError(
                    f"the node failed the study at stage {audit.failed_stage}: "
                    f"{error.type if error else ''} {error.message if error else ''}"
                )
            _say(f"  processed in {audit.duration_ms / 1000:.1f} s; delivering results ...")
            if not audit.objects:
                return audit
        if audit is not None and (spool / OUTBOX_DB).exists():
            with Outbox(spool) as outbox:
                rows = [r for r in outbox.all() if r.study_uid == study_uid]
            if rows and all(r.state is DeliveryState.DELIVERED for r in rows):
                return audit
            dead = [r for r in rows if r.state is DeliveryState.DEAD]
            if dead:
                raise DemoError(f"{len(dead)} result object(s) could not be delivered")
        time.sleep(0.3)
    raise DemoError(f"no delivered results within {timeout_s:.0f} s (see {spool.parent}/node.log)")


def collect_from_orthanc(
    orthanc: OrthancServer, audit: AuditRecord, out: Path
) -> tuple[Delivered, ...]:
    """Download each delivered result object from Orthanc into DIR."""
    got: list[Delivered] = []
    for obj in audit.objects:
        found = orthanc.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"SOPInstanceUID": obj.sop_instance_uid}},
        )
        if not found:
            raise DemoError(f"result {obj.sop_instance_uid} is not in Orthanc")
        target = _copy_path(out, obj.kind, obj.sop_instance_uid, len(got))
        target.write_bytes(orthanc.get_bytes(f"/instances/{found[0]}/file"))
        got.append(
            Delivered(
                kind=obj.kind,
                sop_instance_uid=obj.sop_instance_uid,
                where=f"Orthanc instance {found[0]}",
                copy=target,
            )
        )
    return tuple(got)


def collect_from_local(pacs: LocalPacs, audit: AuditRecord, out: Path) -> tuple[Delivered, ...]:
    """Copy each result object our stand-in PACS received into DIR."""
    got: list[Delivered] = []
    for obj in audit.objects:
        src = pacs.received.get(obj.sop_instance_uid)
        if src is None:
            raise DemoError(f"result {obj.sop_instance_uid} did not reach the PACS")
        target = _copy_path(out, obj.kind, obj.sop_instance_uid, len(got))
        shutil.copyfile(src, target)
        got.append(
            Delivered(
                kind=obj.kind,
                sop_instance_uid=obj.sop_instance_uid,
                where=str(src),
                copy=target,
            )
        )
    return tuple(got)


def _copy_path(out: Path, kind: str, sop_uid: str, index: int) -> Path:
    if kind == "sr":
        return out / "sr.dcm"
    folder = out / "heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"sc_{index:02d}.dcm"


def heatmap_png(delivered: tuple[Delivered, ...], target: Path) -> bool:
    """Write the first delivered heatmap (caption burned in) as a PNG a person can open."""
    import matplotlib.image
    import pydicom

    scs = [d for d in delivered if d.kind == "sc"]
    if not scs:
        return False
    ds = pydicom.dcmread(scs[0].copy)
    matplotlib.image.imsave(target, ds.pixel_array)
    return True


# --- the command -----------------------------------------------------------------------------


def cmd_demo(args: DemoArgs) -> int:
    """`neuronode demo --out DIR`: synthetic study -> running node -> results in the PACS."""
    from node.bundles.bundle import set_torch_threads
    from node.cli.show import format_results
    from node.config import load_rules
    from node.pipeline.models import check_bundles
    from node.service import Node

    set_torch_threads()

    started = time.monotonic()
    out: Path = args.out.absolute()
    seed: int = DEFAULT_SEED if args.seed is None else int(args.seed)
    phenotype: str = args.phenotype or DEFAULT_PHENOTYPE
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    for old in (out / "sr.dcm", out / "heatmap.png"):
        old.unlink(missing_ok=True)
    shutil.rmtree(out / "heatmaps", ignore_errors=True)
    run.mkdir(parents=True)
    log_stream = (run / "node.log").open("w", encoding="utf-8")
    configure(fmt="json", level="info", stream=log_stream)  # the console shows the story only
    _say(f"neuronode demo -> {out}")
    _say(NOT_FOR_CLINICAL_USE)

    _say(f"1. writing a synthetic {phenotype} study (seed {seed}) ...")
    study_uid, n_files = write_study(run / "study", seed, phenotype)
    _say(f"   {n_files} DICOM files in {run / 'study'}")

    models = models_dir()
    tasks, notes = available_tasks(models)
    for note in notes:
        _say(f"   note: {note}")
    if not tasks:
        _say(f"   no specialist bundle in {models}: the node will classify sequences only")

    node_port = free_port()
    orthanc: OrthancServer | None = None
    pacs: LocalPacs | None = None
    node: Node | None = None
    try:
        if orthanc_binary() is not None:
            _say("2. starting Orthanc (the PACS) on 127.0.0.1 ...")
            orthanc = OrthancServer(run / "orthanc", node_port=node_port, node_aet=NODE_AET)
            orthanc.start()
            destination = {
                "kind": "dicom",
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
            _say(f"   Orthanc: DICOM port {orthanc.dicom_port}, web {orthanc.url}")
        else:
            _say("2. Orthanc is not installed: a storage SCP of our own stands in for the PACS")
            pacs = LocalPacs(run / "pacs")
            destination = {
                "kind": "dicom",
                "name": "pacs",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.port,
            }
            _say(f"   PACS: {pacs.aet} on port {pacs.port}, files in {pacs.folder}")

        rules_path = write_rules(run, node_port=node_port, destination=destination, tasks=tasks)
        rules = load_rules(rules_path)
        problems = check_bundles(rules)
        if problems:
            raise ConfigError("; ".join(problems))
        rules.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        set_correlation_key(load_or_create_key(rules.storage.spool_dir / "log.key"))
        _say(f"3. starting the node ({NODE_AET} on port {node_port}; rules {rules_path}) ...")
        node = Node(rules, in_process=True)  # the demo logs to its own file, models loaded
        node.start()

        if orthanc is not None:
            tool = push(run / "study", "127.0.0.1", orthanc.dicom_port, orthanc.aet)
            _say(f"4. sent the study to Orthanc with {tool}; Orthanc forwards it to the node ...")
            orthanc.forward_study(study_uid)
        else:
            tool = push(run / "study", "127.0.0.1", node_port, NODE_AET)
            _say(f"4. sent the study to the node with {tool} ...")

        _say("5. waiting for the node: quiet period, classification, models, Grad-CAM ...")
        audit = wait_for_results(rules.storage.spool_dir, study_uid, RESULT_TIMEOUT_S)

        _say()
        _say(format_results(audit))
        _say()
        if orthanc is not None:
            delivered = collect_from_orthanc(orthanc, audit, out)
        elif pacs is not None:
            delivered = collect_from_local(pacs, audit, out)
        else:  # pragma: no cover - one of the two always exists
            delivered = ()
        sr = [d for d in delivered if d.kind == "sr"]
        scs = [d for d in delivered if d.kind == "sc"]
        pacs_name = "Orthanc" if orthanc is not None else f"the stand-in PACS ({PACS_AET})"
        _say(f"delivered to {pacs_name}: {len(sr)} SR + {len(scs)} heatmap images")
        for d in sr:
            _say(f"  SR {d.sop_instance_uid}: {d.where}")
        for d in scs[:3]:
            _say(f"  heatmap {d.sop_instance_uid}: {d.where}")
        if len(scs) > 3:
            _say(f"  ... and {len(scs) - 3} more heatmaps")
        if orthanc is not None:
            _say(f"  (Orthanc's web viewer at {orthanc.url}/app/explorer.html while it runs)")
        _say(f"copies: {out / 'sr.dcm'}" if sr else "copies: no SR was made")
        if scs:
            _say(f"        {out / 'heatmaps'}/ ({len(scs)} Secondary Captures)")
        if heatmap_png(delivered, out / "heatmap.png"):
            _say(f"        {out / 'heatmap.png'} (one heatmap, to look at)")
        _say(f"audit: {rules.storage.spool_dir / 'results' / uid_key(study_uid) / 'audit.json'}")
        _say()
        _say(NOT_FOR_CLINICAL_USE)
        _say(f"demo finished in {time.monotonic() - started:.0f} s")
        if args.keep_running:
            pacs_where = orthanc.url if orthanc is not None else f"port {destination['port']}"
            _say(f"keeping the PACS ({pacs_where}) and the node running; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if node is not None:
            node.stop(grace_s=5.0)
        if orthanc is not None:
            orthanc.stop()
        if pacs is not None:
            pacs.stop()
        configure(fmt="json", level="warning")
        log_stream.close()
