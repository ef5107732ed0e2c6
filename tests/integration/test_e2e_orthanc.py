"""End to end with a real Orthanc as the PACS: scanner -> Orthanc -> node -> SR + SC -> Orthanc.

dcmtk storescu pushes a synthetic study to Orthanc, Orthanc forwards it to a running
`neuronode serve` (REST /modalities/neuronode/store), and the node delivers its SR and Grad-CAM
Secondary Captures back to Orthanc, where they are read back over REST and checked: finding,
probability (against the node's audit), references to the source images, heatmap count,
patient/study identity, dciodvfy and dcentvfy. Then an outage (Orthanc down while the node
delivers) and the same study processed twice, both without duplicates in the PACS.

Models: the shipped bundles under models/ when they load; otherwise untrained bundles written
by the production writer into a temp folder (this test checks the plumbing, not accuracy; the
rule file lets the tag rules win a disagreement with the sequence CNN for the same reason).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from node.lab.orthanc import OrthancServer, free_port, orthanc_binary
from node.report.codes import finding_code
from tests.conftest import REPO, system_tool
from tests.integration.conftest import NodeProc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEATMAPS_PER_SERIES = 2
# Small studies keep the file well under its time budget (synthesis, inference, Grad-CAM).
STUDY_SIZE = 128
STUDY_SLICES = 16
TASK_ROUTES = {
    "gbm_pcnsl": ("gbm_pcnsl_t1c",),
    "glioma_grade": ("glioma_grade_t1c",),
    "tubers": ("tubers_flair",),
}
CERTAINTY = "111012"


def _loads(path: Path) -> bool:
    from node.bundles.bundle import load_bundle
    from node.errors import ModelUnavailable

    try:
        load_bundle(path)
    except ModelUnavailable:
        return False
    return True


def _bundles(tmp: Path) -> tuple[Path, dict[str, Any], str]:
    """(models_dir, tasks for the rule file, where the bundles came from)."""
    from node.config import Rules

    defaults = Rules().tasks
    shipped = REPO / "models"

    def tasks_in(models: Path) -> dict[str, Any]:
        tasks: dict[str, Any] = {}
        for name, bundles in TASK_ROUTES.items():
            routes = [
                r.model_dump(mode="json")
                for r in defaults[name].models
                if r.bundle in bundles and _loads(models / r.bundle)
            ]
            if routes:
                tasks[name] = {
                    **defaults[name].model_dump(mode="json"),
                    "models": routes,
                    "enabled": True,
                    "requires_lesion": None,  # the lesion gate has its own tests
                }
        return tasks

    tasks = tasks_in(shipped)
    if tasks:
        return shipped, tasks, "shipped"
    import torch

    from node.bundles import bundle as bundle_io
    from node.lab.train import recipes

    models = tmp / "models"
    for names in TASK_ROUTES.values():
        for name in names:
            recipe = recipes.get_recipe(name)
            torch.manual_seed(0)
            net = bundle_io.build_network(recipe.network_name, recipe.network_args)
            meta = recipes.bundle_metadata(recipe, temperature=1.0, training={}, metrics={})
            bundle_io.write_bundle(models / name, meta, net.state_dict(), "# test bundle\n")
    return models, tasks_in(models), "untrained test bundles"


@dataclass
class E2ENode(NodeProc):
    """A `neuronode serve` whose rule file has models, tasks and Orthanc as the destination."""

    extra: dict[str, Any] | None = None

    def write_rules(self) -> None:
        doc: dict[str, Any] = {
            "node": {
                "ae_title": self.ae_title,
                "bind_address": "127.0.0.1",
                "port": self.port,
                "allowed_callers": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1"},
                    {"ae_title": "STORESCU", "host": "127.0.0.1"},
                ],
            },
            "http": {"port": 0},  # several nodes may run at once: no fixed HTTP port
            "storage": {"spool_dir": str(self.spool), "min_free_disk_mb": 1},
            "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.1},
            "processing": {"workers": 1, "lease_s": 120, "max_attempts": 2},
            "logging": {"format": "json", "level": "info"},
            "outputs": {"heatmaps_per_series": HEATMAPS_PER_SERIES},
            "delivery": {"max_attempts": 50, "backoff_initial_s": 0.5, "backoff_max_s": 2},
            **(self.extra or {}),
        }
        self.rules_path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    def audits(self) -> dict[str, dict[str, Any]]:
        """Audit records by Study Instance UID."""
        out = {}
        for path in (self.spool / "results").glob("*/audit.json"):
            audit = json.loads(path.read_text(encoding="utf-8"))
            out[audit["study_instance_uid"]] = audit
        return out

    def outbox_rows(self) -> list[tuple[Any, ...]]:
        """(sop_uid, state, attempts) of every outbox row."""
        db = self.spool / "outbox.sqlite"
        if not db.exists():
            return []
        conn = sqlite3.connect(db, timeout=10)
        try:
            return list(conn.execute("SELECT sop_uid, state, attempts FROM deliveries"))
        finally:
            conn.close()


@dataclass
class Env:
    orthanc: OrthancServer
    node: E2ENode
    studies: dict[str, tuple[str, Path]]  # name -> (study uid, folder)
    storescu: str
    rules_extra: dict[str, Any]
    bundle_source: str


def _write_study(folder: Path, seed: int, phenotype: str) -> str:
    from node.lab.synth import write_studies

    manifest = write_studies(
        folder,
        studies=1,
        seed=seed,
        phenotypes=[phenotype],
        vendors=["siemens"],
        size=STUDY_SIZE,
        slices=STUDY_SLICES,
        distractors=False,
    )
    return str(manifest.studies[0]["study_uid"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    storescu = system_tool("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk)")
    tmp = tmp_path_factory.mktemp("e2e")
    models, tasks, source = _bundles(tmp)
    if not tasks:
        pytest.skip(f"no task bundle could be found or written in {models}")
    studies = {
        "a": (_write_study(tmp / "study_a", 101, "gbm"), tmp / "study_a"),
        "b": (_write_study(tmp / "study_b", 202, "tsc"), tmp / "study_b"),
    }
    node_dir = tmp / "node"
    node_dir.mkdir()
    node = E2ENode(workdir=node_dir, port=free_port())
    orthanc = OrthancServer(tmp / "orthanc", node_port=node.port)
    extra = {
        "models_dir": str(models),
        "tasks": tasks,
        # The shipped sequence CNN votes, but the tag rules (exact on synthetic headers) win a
        # disagreement, so what is routed does not depend on that model's accuracy here.
        "sequence": {"disagreement": "prefer_tags"},
        "destinations": [
            {
                "kind": "dicom",
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
    }
    node.extra = extra
    orthanc.start()
    node.start(timeout_s=60)
    try:
        yield Env(
            orthanc=orthanc,
            node=node,
            studies=studies,
            storescu=storescu,
            rules_extra=extra,
            bundle_source=source,
        )
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
        orthanc.stop()


def _storescu(storescu: str, folder: Path, port: int, called: str) -> None:
    done = subprocess.run(
        [
            storescu,
            *("-aet", "STORESCU", "-aec", called, "+sd", "+r", "-nh"),
            *("127.0.0.1", str(port), str(folder)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _push_via_orthanc(env: Env, name: str) -> str:
    study_uid, folder = env.studies[name]
    _storescu(env.storescu, folder, env.orthanc.dicom_port, env.orthanc.aet)
    env.orthanc.forward_study(study_uid)
    return study_uid


def _wait_audit(node: E2ENode, study_uid: str, timeout_s: float = 120) -> dict[str, Any]:
    audit: dict[str, Any] = {}

    def done() -> bool:
        nonlocal audit
        audit = node.audits().get(study_uid, {})
        return bool(audit) and audit["status"] in ("done", "failed", "skipped")

    node.wait_for(done, timeout_s=timeout_s)
    assert audit["status"] == "done", json.dumps(audit.get("error"))
    return audit


def _wait_in_orthanc(env: Env, sop_uids: set[str], timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    stored: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stored = env.orthanc.by_sop_uid()
        if sop_uids <= stored.keys():
            return stored
        time.sleep(0.5)
    missing = sop_uids - stored.keys()
    raise AssertionError(
        f"{len(missing)} result(s) never reached Orthanc; outbox: "
        f"{env.node.outbox_rows()}\n{env.node.logs()[-3000:]}"
    )


def _certainties(sr: Dataset) -> dict[str, float]:
    """Certainty of Finding (%) per measurement group, keyed by its tracking identifier text."""
    found: dict[str, float] = {}

    def walk(items: Any, group: str | None) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            tracking = group
            if "ContentSequence" in item:
                for child in item.ContentSequence:
                    code = child.get("ConceptNameCodeSequence")
                    if code and code[0].CodeValue == "112039":  # Tracking Identifier
                        tracking = str(child.TextValue)
            if name is not None and name.CodeValue == CERTAINTY and tracking is not None:
                found[tracking] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence, tracking)

    walk(sr.ContentSequence, None)
    return found


def _verify(tool: str, paths: list[Path]) -> str:
    done = subprocess.run([tool, *map(str, paths)], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def test_results_reach_orthanc_and_match_the_audit(env: Env, tmp_path: Path) -> None:
    study_uid = _push_via_orthanc(env, "a")
    audit = _wait_audit(env.node, study_uid)
    assert audit["not_for_clinical_use"] is True
    assert audit["predictions"], f"nothing was routed: {audit['sequences']}"
    objects = {o["sop_instance_uid"]: o for o in audit["objects"]}
    sr_uids = [u for u, o in objects.items() if o["kind"] == "sr"]
    sc_uids = [u for u, o in objects.items() if o["kind"] == "sc"]
    assert len(sr_uids) == 1
    assert len(sc_uids) == HEATMAPS_PER_SERIES * len(audit["predictions"])
    stored = _wait_in_orthanc(env, set(objects))

    source = pydicom.dcmread(next(env.studies["a"][1].rglob("*.dcm")), stop_before_pixels=True)
    for uid in objects:
        tags = stored[uid]
        assert tags["PatientID"] == str(source.PatientID)
        assert tags["StudyInstanceUID"] == study_uid

    out = tmp_path / "results"
    out.mkdir()
    files: dict[str, Path] = {}
    for uid in objects:
        path = out / f"{uid}.dcm"
        path.write_bytes(env.orthanc.get_bytes(f"/instances/{stored[uid]['_id']}/file"))
        files[uid] = path
    sr = pydicom.dcmread(files[sr_uids[0]])
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription

    # The finding and its probability, as the node's audit has them.
    certainty = _certainties(sr)
    for finding in audit["findings"]:
        if finding["probability"] is None:
            assert f"task {finding['task']}" not in certainty
            continue
        assert certainty[f"task {finding['task']}"] == pytest.approx(
            round(finding["probability"] * 100, 2), abs=0.01
        )
    text = json.dumps(stored[sr_uids[0]]["ContentSequence"])
    for finding in audit["findings"]:
        if finding["probability"] is not None:  # the coded finding and its status are there
            code = finding_code(finding["positive_label"])
            assert code.value in text and code.meaning in text

    # Every heatmap points at a source slice of the study that Orthanc holds; the SR points
    # at every heatmap.
    source_uids = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in env.studies["a"][1].rglob("*.dcm")
    }
    sr_refs = {
        str(ref.ReferencedSOPInstanceUID)
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    for uid in sc_uids:
        sc = pydicom.dcmread(files[uid], stop_before_pixels=True)
        assert sc.BurnedInAnnotation == "YES"
        src = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert src in source_uids and src in stored
        assert uid in sr_refs
        assert uid in text

    dciodvfy = system_tool("dciodvfy")
    dcentvfy = system_tool("dcentvfy")
    if dciodvfy is None or dcentvfy is None:
        pytest.skip("dicom3tools is not installed (apt-get install dicom3tools)")
    for path in files.values():
        report = _verify(dciodvfy, [path])
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)
    sample = sorted(env.studies["a"][1].rglob("*.dcm"))[:6]
    report = _verify(dcentvfy, [*sample, *files.values()])
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_same_study_twice_gives_no_duplicates(env: Env, tmp_path: Path) -> None:
    study_uid = _push_via_orthanc(env, "a")  # again, if the first test ran: duplicates only
    audit = _wait_audit(env.node, study_uid)
    results = {o["sop_instance_uid"] for o in audit["objects"]}
    _wait_in_orthanc(env, results)
    before = len(env.orthanc.instances())

    # A second node with an empty spool processes the same study from scratch: the result
    # UIDs are derived from the sources and model versions, so the PACS gets the same objects.
    second = E2ENode(workdir=tmp_path, port=free_port(), extra=env.rules_extra)
    second.start(timeout_s=60)
    try:
        _storescu(env.storescu, env.studies["a"][1], second.port, second.ae_title)
        audit2 = _wait_audit(second, study_uid)
        assert {o["sop_instance_uid"] for o in audit2["objects"]} == results

        def delivered() -> bool:
            rows = second.outbox_rows()
            return bool(rows) and all(r[1] == "delivered" for r in rows)

        second.wait_for(delivered, timeout_s=60)
    finally:
        second.stop()
    assert len(env.orthanc.instances()) == before


def test_outage_then_delivery_without_duplicates(env: Env) -> None:
    study_uid, folder = env.studies["b"]
    # The PACS is down before the study reaches the node (sent straight from the "scanner"),
    # so every delivery attempt meets a closed port until it comes back. (Stopping Orthanc
    # after it forwarded the study races with its own graceful shutdown, which keeps
    # accepting associations for a while.)
    env.orthanc.stop()
    _storescu(env.storescu, folder, env.node.port, env.node.ae_title)
    audit = _wait_audit(env.node, study_uid)
    results = {o["sop_instance_uid"] for o in audit["objects"]}
    assert results

    def tried_and_failed() -> bool:
        rows = [r for r in env.node.outbox_rows() if r[0] in results]
        return len(rows) == len(results) and all(r[1] != "delivered" and r[2] >= 1 for r in rows)

    env.node.wait_for(tried_and_failed, timeout_s=60)
    env.orthanc.start()
    stored = _wait_in_orthanc(env, results)
    study_instances = [s for s in stored.values() if s["StudyInstanceUID"] == study_uid]
    assert sorted(s["SOPInstanceUID"] for s in study_instances) == sorted(results)
    # Orthanc would keep one copy of a re-sent UID anyway: the outbox itself sent each once.
    rows = [r for r in env.node.outbox_rows() if r[0] in results]
    assert all(r[1] == "delivered" for r in rows)
    assert len({r[0] for r in rows}) == len(rows) == len(results)
