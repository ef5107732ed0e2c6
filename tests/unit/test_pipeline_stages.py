"""Pipeline stages after LOAD: classify, qualify, route, infer, ensemble, report, outbox, audit.

Runs on one small synthetic study with untrained bundles written by the production writer:
these tests check what each stage hands on and records, not model accuracy.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from structlog.testing import capture_logs

from node.cli import study as study_cli
from node.cli.study import ProcessArgs, cmd_process
from node.config import Rules
from node.deliver.outbox import Outbox
from node.errors import ConfigError, ModelUnavailable
from node.pipeline.audit import audit_path
from node.pipeline.context import Stage
from node.pipeline.models import check_bundles, worker_bundle
from node.pipeline.runner import process_study
from node.pipeline.stages import STAGES
from node.records import StudyJob

torch.set_num_threads(1)

TASK_BUNDLES = ("gbm_pcnsl_t1c", "tubers_flair")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(autouse=True)
def _keep_log_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """cmd_process configures logging on the live stderr; keep that from leaking across tests."""
    monkeypatch.setattr(study_cli, "configure", lambda **_kw: None)


def _write_bundle(folder: Path, name: str) -> None:
    from node.bundles import bundle as bundles
    from node.lab.train import recipes

    recipe = recipes.get_recipe(name)
    torch.manual_seed(0)
    net = bundles.build_network(recipe.network_name, recipe.network_args)
    meta = recipes.bundle_metadata(recipe, temperature=1.0, training={}, metrics={})
    bundles.write_bundle(folder / name, meta, net.state_dict(), "# test bundle\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 6-series study (T2, FLAIR, DWI, ADC, T1, T1C) and task bundles in a temp folder."""
    from node.lab.synth import write_studies

    root = tmp_path_factory.mktemp("stages")
    manifest = write_studies(
        root / "study",
        studies=1,
        seed=5,
        phenotypes=["gbm"],
        vendors=["siemens"],
        size=64,
        slices=10,
        distractors=False,
    )
    entry = manifest.studies[0]
    series: dict[str, list[Path]] = {}
    for s in entry["series"]:  # type: ignore[attr-defined]
        series[s["label"]] = sorted((root / "study" / s["folder"]).glob("*.dcm"))
    models = root / "models"
    for name in TASK_BUNDLES:
        _write_bundle(models, name)
    return {"root": root, "study_uid": entry["study_uid"], "series": series, "models": models}


def _rules(world: dict[str, Any], **extra: Any) -> Rules:
    doc: dict[str, Any] = {
        "models_dir": str(world["models"]),
        "storage": {"spool_dir": str(world["root"] / "spool")},
        "tasks": {
            "gbm_pcnsl": {
                "positive_label": "glioblastoma",
                "negative_label": "primary CNS lymphoma",
                "models": [{"bundle": "gbm_pcnsl_t1c", "sequences": ["T1C"]}],
            },
            "tubers": {
                "positive_label": "cortical tubers",
                "negative_label": "no cortical tubers",
                "models": [{"bundle": "tubers_flair", "sequences": ["FLAIR"]}],
            },
        },
        "outputs": {"heatmaps_per_series": 1},
    }
    doc.update(extra)
    return Rules.model_validate(doc)


def _paths(world: dict[str, Any], *labels: str) -> tuple[Path, ...]:
    wanted = labels or tuple(world["series"])
    return tuple(p for label in wanted for p in world["series"][label])


def _job(world: dict[str, Any], paths: tuple[Path, ...], **kw: Any) -> StudyJob:
    kw.setdefault("attempt", 1)
    return StudyJob(job_id=1, study_uid=world["study_uid"], instance_paths=paths, **kw)


def _audit(out: Path, world: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(audit_path(out, world["study_uid"]).read_text())
    return result


def test_full_run_classifies_routes_infers_reports_and_audits(
    world: dict[str, Any], tmp_path: Path
) -> None:
    with capture_logs() as logs:
        process_study(_job(world, _paths(world)), _rules(world), out_dir=tmp_path)
    audit = _audit(tmp_path, world)
    assert audit["status"] == "done" and audit["not_for_clinical_use"] is True
    assert [s["stage"] for s in audit["stages"]] == [s.value for s, _ in STAGES[:-1]]
    assert all(s["duration_ms"] >= 0 for s in audit["stages"])
    # Each stage's CPU time too; INFER ran two networks, so it used some.
    assert all(s["cpu_ms"] is not None and s["cpu_ms"] >= 0 for s in audit["stages"])
    assert next(s["cpu_ms"] for s in audit["stages"] if s["stage"] == "infer") > 0
    assert "tag rules alone" in audit["sequence_cnn"]  # no sequence bundle in models_dir
    labels = sorted(d["label"] for d in audit["sequences"])
    assert labels == ["ADC", "DWI", "FLAIR", "T1", "T1C", "T2"]
    by_label = {d["label"]: d["series_instance_uid"] for d in audit["sequences"]}
    assert {(r["bundle"], r["series_instance_uid"]) for r in audit["routes"]} == {
        ("gbm_pcnsl_t1c", by_label["T1C"]),
        ("tubers_flair", by_label["FLAIR"]),
    }
    preds = {p["model_id"]: p for p in audit["predictions"]}
    assert set(preds) == set(TASK_BUNDLES)
    assert preds["gbm_pcnsl_t1c"]["task"] == "gbm_pcnsl"
    assert all(0 < p["probability"] < 1 and len(p["heatmap_slices"]) == 1 for p in preds.values())
    findings = {f["task"]: f for f in audit["findings"]}
    assert [m.split()[0] for m in findings["gbm_pcnsl"]["models"]] == ["gbm_pcnsl_t1c"]
    # one model per task: the study-level probability is that model's series probability
    assert findings["gbm_pcnsl"]["probability"] == pytest.approx(
        preds["gbm_pcnsl_t1c"]["probability"], abs=1e-6
    )
    assert audit["n_findings"] == 2
    kinds = sorted(o["kind"] for o in audit["objects"])
    assert kinds == ["sc", "sc", "sr"]
    sr_obj = next(o for o in audit["objects"] if o["kind"] == "sr")
    sr = pydicom.dcmread(sr_obj["file"])
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == world["study_uid"]
    assert "PredecessorDocumentsSequence" not in sr
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for p in _paths(world, "T1C", "FLAIR")}
    for o in audit["objects"]:
        if o["kind"] == "sc":
            sc = pydicom.dcmread(o["file"])
            assert sc.SOPClassUID == SECONDARY_CAPTURE
            assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in sources
    assert audit["destinations"] == [] and audit["deliveries_enqueued"] is None
    summary = [e for e in logs if e["event"] == "study_processed"]
    assert len(summary) == 1 and summary[0]["n_findings"] == 2 and summary[0]["n_objects"] == 3


def test_each_series_is_decoded_once_per_job(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLASSIFY (the T1 pair compared too), INFER and HEATMAPS read the routed series from the
    job's decoded series instead of decoding them again (issue 15)."""
    from collections import Counter

    from node.dicom import volumes as dicom_volumes

    decoded: Counter[str] = Counter()
    real = dicom_volumes._decode_series

    def counted(layout: Any) -> Any:
        decoded[layout.series_uid] += 1
        return real(layout)

    monkeypatch.setattr(dicom_volumes, "_decode_series", counted)
    process_study(_job(world, _paths(world)), _rules(world), out_dir=tmp_path)
    audit = _audit(tmp_path, world)
    by_label = {d["label"]: d["series_instance_uid"] for d in audit["sequences"]}
    assert {o["kind"] for o in audit["objects"]} == {"sr", "sc"}  # heatmaps were drawn
    assert decoded[by_label["T1C"]] == 1 and decoded[by_label["FLAIR"]] == 1  # routed
    assert by_label["T1"] in decoded  # the T1 pair's images were compared (no sequence CNN)
    assert set(decoded.values()) == {1}


def test_late_series_gives_an_sr_that_supersedes_the_first(
    world: dict[str, Any], tmp_path: Path
) -> None:
    rules = _rules(world)
    first = _paths(world, "T2", "DWI", "ADC", "T1", "T1C")
    process_study(_job(world, first), rules, out_dir=tmp_path)
    sr1 = next(o for o in _audit(tmp_path, world)["objects"] if o["kind"] == "sr")
    # The FLAIR arrives late: the study is re-opened and processed again.
    process_study(_job(world, _paths(world), reopened=True), rules, out_dir=tmp_path)
    audit2 = _audit(tmp_path, world)
    sr2 = next(o for o in audit2["objects"] if o["kind"] == "sr")
    assert sr2["sop_instance_uid"] != sr1["sop_instance_uid"]
    assert audit2["predecessor_sr"] == sr1["sop_instance_uid"]
    ds = pydicom.dcmread(sr2["file"])
    refs = [
        str(r.ReferencedSOPInstanceUID)
        for item in ds.PredecessorDocumentsSequence
        for s in item.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    ]
    assert refs == [sr1["sop_instance_uid"]]
    # The same study once more: the same SR (same UID, still naming its predecessor).
    process_study(_job(world, _paths(world), reopened=True), rules, out_dir=tmp_path)
    audit3 = _audit(tmp_path, world)
    sr3 = next(o for o in audit3["objects"] if o["kind"] == "sr")
    assert sr3["sop_instance_uid"] == sr2["sop_instance_uid"]
    assert audit3["predecessor_sr"] == sr1["sop_instance_uid"]


def test_our_own_results_coming_back_are_not_analysed(
    world: dict[str, Any], tmp_path: Path
) -> None:
    rules = _rules(world)
    process_study(_job(world, _paths(world)), rules, out_dir=tmp_path / "a")
    first = _audit(tmp_path / "a", world)
    returned = tuple(Path(o["file"]) for o in first["objects"])
    process_study(_job(world, _paths(world) + returned), rules, out_dir=tmp_path / "b")
    second = _audit(tmp_path / "b", world)
    assert second["own_results_ignored"] == 3
    assert len(second["sequences"]) == 6
    assert {o["sop_instance_uid"] for o in second["objects"]} == {
        o["sop_instance_uid"] for o in first["objects"]
    }


def test_study_that_does_not_qualify_is_skipped_without_results(
    world: dict[str, Any], tmp_path: Path
) -> None:
    rules = _rules(world, qualify={"modalities": ["CT"]})
    with capture_logs() as logs:
        process_study(_job(world, _paths(world)), rules, out_dir=tmp_path)
    audit = _audit(tmp_path, world)
    assert audit["status"] == "skipped" and audit["qualifies"] is False
    assert "CT" in audit["qualify_reason"]
    assert audit["routes"] == [] and audit["findings"] == [] and audit["objects"] == []
    assert not (tmp_path / audit["study_key"] / "objects").exists()
    assert [e["status"] for e in logs if e["event"] == "study_processed"] == ["skipped"]


def test_no_assessable_task_makes_no_objects(world: dict[str, Any], tmp_path: Path) -> None:
    process_study(_job(world, _paths(world, "T1", "DWI")), _rules(world), out_dir=tmp_path)
    audit = _audit(tmp_path, world)
    assert audit["status"] == "done"
    assert {f["status"] for f in audit["findings"]} == {"not-assessable"}
    assert audit["objects"] == [] and "no task assessable" in audit["report_note"]


def test_missing_bundle_fails_infer_with_the_reason(world: dict[str, Any], tmp_path: Path) -> None:
    rules = _rules(
        world,
        tasks={
            "gbm_pcnsl": {
                "positive_label": "glioblastoma",
                "negative_label": "primary CNS lymphoma",
                "models": [{"bundle": "not_installed", "sequences": ["T1C"]}],
            }
        },
    )
    with pytest.raises(ModelUnavailable, match="not_installed"):
        process_study(_job(world, _paths(world)), rules, out_dir=tmp_path)
    audit = _audit(tmp_path, world)
    assert audit["status"] == "failed" and audit["failed_stage"] == "infer"
    assert audit["error"]["type"] == "ModelUnavailable"
    assert "gbm_pcnsl" in audit["error"]["message"] and "not found" in audit["error"]["message"]
    assert audit["objects"] == []
    problems = check_bundles(rules)
    assert len(problems) == 1 and "not_installed" in problems[0]


def test_sequence_cnn_votes_when_its_bundle_is_present(
    world: dict[str, Any], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(world["models"], models)
    _write_bundle(models, "sequence")
    rules = _rules(world, models_dir=str(models))
    process_study(_job(world, _paths(world)), rules, out_dir=tmp_path)
    audit = _audit(tmp_path, world)
    assert audit["sequence_cnn"].startswith("sequence CNN sequence ")
    assert "ran on 6 of 6 series" in audit["sequence_cnn"]
    assert all(d["cnn_label"] is not None and d["cnn_votes"] for d in audit["sequences"])


def test_each_thread_keeps_its_own_bundle_copy(world: dict[str, Any]) -> None:
    path = world["models"] / "gbm_pcnsl_t1c"
    mine = worker_bundle(path)
    assert worker_bundle(path) is mine  # loaded once per thread
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(worker_bundle(path)))
    t.start()
    t.join()
    assert other[0] is not mine and other[0].network is not mine.network


def test_outbox_stage_queues_every_object_for_every_destination(
    world: dict[str, Any], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    dests = [
        {"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {"kind": "dicomweb", "name": "web", "url": "http://127.0.0.1:8042/dicom-web"},
    ]
    rules = _rules(world, destinations=dests, storage={"spool_dir": str(spool)})
    process_study(_job(world, _paths(world)), rules, out_dir=tmp_path / "by-hand")
    assert not (spool / "outbox.sqlite").exists()  # `neuronode process` never delivers
    process_study(_job(world, _paths(world)), rules, out_dir=tmp_path / "node", deliver=True)
    audit = _audit(tmp_path / "node", world)
    assert audit["destinations"] == ["pacs", "web"] and audit["deliveries_enqueued"] == 6
    with Outbox(spool) as outbox:
        rows = outbox.all()
    assert sorted((r.sop_uid, r.destination) for r in rows) == sorted(
        (o["sop_instance_uid"], d) for o in audit["objects"] for d in ("pacs", "web")
    )
    process_study(_job(world, _paths(world)), rules, out_dir=tmp_path / "node", deliver=True)
    assert _audit(tmp_path / "node", world)["deliveries_enqueued"] == 0  # same UIDs: no rows


def test_cmd_process_prints_sequences_findings_and_writes_objects(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        json.dumps(_rules(world).model_dump(mode="json", exclude={"storage"})), encoding="utf-8"
    )
    study_dir = world["root"] / "study"
    args = ProcessArgs(directory=study_dir, rules=rules_file, out=tmp_path / "out")
    assert cmd_process(args) == 0
    printed = capsys.readouterr().out
    assert "NOT FOR CLINICAL USE" in printed
    assert "t2_tirm_tra_dark-fluid" in printed and "FLAIR" in printed
    assert "gbm_pcnsl: " in printed and "p(glioblastoma) = " in printed
    assert "1 SR + 2 heatmap SC written to" in printed
    audit = _audit(tmp_path / "out", world)
    assert all(Path(o["file"]).is_file() for o in audit["objects"])


def test_serve_refuses_to_start_when_a_task_bundle_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.cli import operate

    monkeypatch.setattr(operate, "configure", lambda *_a, **_kw: None)

    (tmp_path / "models").mkdir()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        f"models_dir: models\nstorage:\n  spool_dir: {tmp_path / 'spool'}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match="refusing to start") as info:
        operate.cmd_serve(operate.ServeArgs(rules=rules_file))
    assert "gbm_pcnsl_t1c" in str(info.value) and "enabled: false" in str(info.value)
    assert not (tmp_path / "spool").exists()  # nothing was started


def test_stage_names_are_in_pipeline_order() -> None:
    assert [s for s, _ in STAGES] == list(Stage)


def test_sender_thread_delivers_the_outbox_and_stops_cleanly(
    world: dict[str, Any], tmp_path: Path
) -> None:
    import time

    from node.lab.demo import LocalPacs
    from node.service import Node
    from tests.conftest import free_port

    process_study(_job(world, _paths(world)), _rules(world), out_dir=tmp_path / "made")
    made = _audit(tmp_path / "made", world)["objects"]
    pacs = LocalPacs(tmp_path / "pacs")
    spool = tmp_path / "spool"
    rules = _rules(
        world,
        node={"port": free_port()},
        http={"port": 0},
        storage={"spool_dir": str(spool), "min_free_disk_mb": 1},
        destinations=[
            {
                "kind": "dicom",
                "name": "up",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.port,
            },
            {
                "kind": "dicom",
                "name": "down",
                "ae_title": "NOBODY",
                "host": "127.0.0.1",
                "port": free_port(),
            },
        ],
        delivery={"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "max_attempts": 100},
    )
    with Outbox(spool) as outbox:
        outbox.enqueue([pydicom.dcmread(o["file"]) for o in made], ("up", "down"), now=time.time())
    node = Node(rules, processor=lambda job: pytest.fail("no study was sent"))
    node.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(pacs.received) < len(made):
            time.sleep(0.1)
        assert set(pacs.received) == {o["sop_instance_uid"] for o in made}
        with Outbox(spool) as outbox:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                # The PACS has the objects a moment before the sender marks its rows delivered.
                rows = outbox.all()
                down = [r for r in rows if r.destination == "down"]
                up_done = all(r.state.value == "delivered" for r in rows if r.destination == "up")
                if up_done and all(r.attempts >= 1 for r in down):
                    break
                time.sleep(0.1)
            rows = outbox.all()
        down = [r for r in rows if r.destination == "down"]
        # The destination that is down backs off its own rows (tried, never delivered or
        # dead; 'sending' while an attempt is under way); the other is unaffected.
        assert {r.state.value for r in rows if r.destination == "up"} == {"delivered"}
        assert down and all(
            r.state.value in ("pending", "sending") and r.attempts >= 1 for r in down
        )
    finally:
        t0 = time.monotonic()
        node.stop(grace_s=5.0)
        pacs.stop()
    assert time.monotonic() - t0 < 6.0
    assert not any(t.is_alive() for t in node._threads if t.name == "sender")


def test_a_changed_result_gets_a_new_uid_that_the_outbox_sends(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """Same series set, more slices of the T1C: the answer changes, so the SR must too."""
    spool = tmp_path / "spool"
    pacs = {"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    rules = _rules(world, destinations=[pacs], storage={"spool_dir": str(spool)})
    t1c = _paths(world, "T1C")
    partial = tuple(p for p in _paths(world) if p not in t1c[4:])
    process_study(_job(world, partial), rules, out_dir=tmp_path, deliver=True)
    first = _audit(tmp_path, world)
    process_study(_job(world, _paths(world), reopened=True), rules, out_dir=tmp_path, deliver=True)
    second = _audit(tmp_path, world)
    p1 = {f["task"]: f["probability"] for f in first["findings"]}
    p2 = {f["task"]: f["probability"] for f in second["findings"]}
    assert p1["gbm_pcnsl"] != p2["gbm_pcnsl"]
    sr1 = next(o for o in first["objects"] if o["kind"] == "sr")
    sr2 = next(o for o in second["objects"] if o["kind"] == "sr")
    assert sr2["sop_instance_uid"] != sr1["sop_instance_uid"]
    assert second["predecessor_sr"] == sr1["sop_instance_uid"]
    with Outbox(spool) as outbox:
        pending = {r.sop_uid for r in outbox.all() if r.state.value == "pending"}
    assert {o["sop_instance_uid"] for o in second["objects"]} <= pending
    # The file queued under the new UID holds the new content.
    queued = pydicom.dcmread(spool / "outbox" / "objects" / f"{sr2['sop_instance_uid']}.dcm")
    assert "PredecessorDocumentsSequence" in queued


def _node_rules(world: dict[str, Any], spool: Path) -> Rules:
    pacs = {"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    return _rules(
        world,
        destinations=[pacs],
        storage={"spool_dir": str(spool)},
        outputs={"heatmaps_per_series": 2},
    )


def test_the_sr_is_queued_and_announced_before_the_heatmaps_are_drawn(
    world: dict[str, Any], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    seen: list[tuple[str, ...]] = []  # the kinds queued each time the senders are told

    def on_queued() -> None:
        with Outbox(spool) as outbox:
            seen.append(tuple(_kind(r.sop_class_uid) for r in outbox.all()))

    stages: list[str] = []
    process_study(
        _job(world, _paths(world)),
        _node_rules(world, spool),
        out_dir=tmp_path / "results",
        deliver=True,
        on_stage=lambda s: stages.append(s.value),
        on_queued=on_queued,
    )
    n_sc = sum(1 for o in _audit(tmp_path / "results", world)["objects"] if o["kind"] == "sc")
    assert n_sc >= 2
    # Told twice: once with the SR alone, again when the heatmaps joined it.
    assert seen == [("sr",), ("sr",) + ("sc",) * n_sc]
    assert stages.index("outbox") < stages.index("heatmaps") < stages.index("audit")
    audit = _audit(tmp_path / "results", world)
    assert [o["kind"] for o in audit["objects"]] == ["sr"] + ["sc"] * n_sc
    assert audit["deliveries_enqueued"] == 1 + n_sc and audit["status"] == "done"
    # What is queued is the file the pipeline wrote (a second name, not a second write).
    with Outbox(spool) as outbox:
        for row in outbox.all():
            made = next(o for o in audit["objects"] if o["sop_instance_uid"] == row.sop_uid)
            assert row.path.stat().st_ino == Path(made["file"]).stat().st_ino


def _kind(sop_class_uid: str) -> str:
    return "sr" if sop_class_uid == COMPREHENSIVE_3D_SR else "sc"


class _Killed(BaseException):
    """The worker dying where a test says (escapes the per-job guard, as a SIGKILL would)."""


def test_a_crash_between_the_sr_and_the_heatmaps_is_redone_without_a_second_sr(
    world: dict[str, Any], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    rules = _node_rules(world, spool)
    out = tmp_path / "results"

    def die_at_heatmaps(stage: Stage) -> None:
        if stage is Stage.HEATMAPS:
            raise _Killed

    with pytest.raises(_Killed):
        process_study(
            _job(world, _paths(world)), rules, out_dir=out, deliver=True, on_stage=die_at_heatmaps
        )
    with Outbox(spool) as outbox:
        first = outbox.all()
    assert [_kind(r.sop_class_uid) for r in first] == ["sr"]  # the SR went out alone
    sr_file = first[0].path.read_bytes()

    process_study(_job(world, _paths(world), attempt=2), rules, out_dir=out, deliver=True)
    audit = _audit(out, world)
    made = {o["sop_instance_uid"]: o["kind"] for o in audit["objects"]}
    with Outbox(spool) as outbox:
        rows = outbox.all()
    assert sorted(r.sop_uid for r in rows) == sorted(made)  # one row each, the SR once
    assert rows[0].sop_uid == first[0].sop_uid and rows[0].row_id == first[0].row_id
    assert [made[r.sop_uid] for r in rows].count("sr") == 1 and len(rows) >= 3
    assert audit["deliveries_enqueued"] == len(rows) - 1  # only the heatmaps were new
    assert audit["predecessor_sr"] is None  # the same result: no superseding SR either
    assert rows[0].path.read_bytes() == sr_file  # the queued SR was left alone
    sr = pydicom.dcmread(rows[0].path)
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
        if ref.ReferencedSOPClassUID == SECONDARY_CAPTURE
    }
    assert referenced == {uid for uid, kind in made.items() if kind == "sc"}


def test_heatmaps_drawn_after_the_sr_are_the_ones_drawn_in_one_go(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFER leaves an axial series' maps to HEATMAPS (after the SR): the pictures must be
    those made when INFER computed them itself."""
    from node.bundles import gradcam

    rules = _rules(world, outputs={"heatmaps_per_series": 2})

    def pictures(out: Path) -> dict[str, bytes]:
        process_study(_job(world, _paths(world)), rules, out_dir=out)
        objects = _audit(out, world)["objects"]
        return {
            o["sop_instance_uid"]: pydicom.dcmread(o["file"]).PixelData
            for o in objects
            if o["kind"] == "sc"
        }

    later = pictures(tmp_path / "later")
    monkeypatch.setattr(gradcam, "key_slices", lambda *_a, **_kw: None)  # maps in INFER
    at_once = pictures(tmp_path / "at-once")
    assert len(later) >= 2 and later == at_once


def test_the_in_process_processor_tells_the_node_each_time_results_are_queued(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """`Node(in_process=True)` (the demo) wakes its senders through this callback."""
    from node.service import pipeline_processor

    rules = _node_rules(world, tmp_path / "spool")
    told: list[int] = []

    def on_queued() -> None:
        with Outbox(tmp_path / "spool") as outbox:
            told.append(len(outbox.all()))

    outcome = pipeline_processor(lambda: rules, on_queued)(_job(world, _paths(world)))
    assert outcome.study_uid == world["study_uid"]
    assert len(told) == 2 and told[0] == 1 and told[1] > 1  # the SR, then the heatmaps too
