"""The outbox: idempotent enqueue, backoff, dead letter, requeue, independent destinations."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from structlog.testing import capture_logs

from node.cli.operate import RequeueArgs, cmd_requeue
from node.config import DeliverySettings, DicomDestination, DicomWebDestination, Rules
from node.deliver.outbox import (
    SENDING_STALE_S,
    Outbox,
    backoff_s,
    deliver_due,
    outbox_study_uids,
    outbox_summary,
)
from node.errors import SendError
from node.records import DeliveryState, SendResult
from node.report.codes import SC_SOP_CLASS_UID, SR_SOP_CLASS_UIDS

PACS = DicomDestination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
WEB = DicomWebDestination(name="web", url="http://127.0.0.1:8042/dicom-web")
DELIVERY = DeliverySettings(
    max_attempts=3, backoff_initial_s=10, backoff_max_s=100, jitter_fraction=0.2
)
RULES = Rules(destinations=(PACS, WEB), delivery=DELIVERY)


def obj(uid: str, sop_class: str = SC_SOP_CLASS_UID, study: str = "1.2.3") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(uid)
    ds.StudyInstanceUID = study
    ds.PatientName = "Secret^Patient"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    return ds


class FakeSender:
    """Records calls; destinations in `down` raise, SOP UIDs in `refuse` get a failure status."""

    def __init__(
        self, down: frozenset[str] = frozenset(), refuse: dict[str, bool] | None = None
    ) -> None:
        self.down = set(down)
        self.refuse = refuse or {}  # uid -> retryable
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(
        self, dest: DicomDestination | DicomWebDestination, paths: Sequence[Path]
    ) -> tuple[SendResult, ...]:
        uids = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
        self.calls.append((dest.name, uids))
        if dest.name in self.down:
            raise SendError(f"destination {dest.name} cannot be reached", retryable=True)
        return tuple(
            SendResult(
                sop_instance_uid=u,
                sent_sop_instance_uid=u,
                sent_sop_class_uid=SC_SOP_CLASS_UID,
                delivered=u not in self.refuse,
                status_code=0xA700 if u in self.refuse else 0,
                retryable=self.refuse.get(u, False),
                message="x",
            )
            for u in uids
        )


def states(outbox: Outbox) -> dict[tuple[str, str], DeliveryState]:
    return {(r.sop_uid, r.destination): r.state for r in outbox.all()}


def test_backoff_doubles_jitters_and_caps() -> None:
    rng = random.Random(1)
    no_jitter = DeliverySettings(backoff_initial_s=5, backoff_max_s=60, jitter_fraction=0)
    assert [backoff_s(a, no_jitter, rng) for a in (1, 2, 3, 4, 5, 9)] == [5, 10, 20, 40, 60, 60]
    waits = [backoff_s(2, DELIVERY, rng) for _ in range(200)]
    assert min(waits) >= 16 and max(waits) <= 24 and len(set(waits)) > 100
    assert all(backoff_s(10, DELIVERY, rng) <= 100 for _ in range(100))


def test_enqueue_is_idempotent_and_atomic(tmp_path: Path, database_url: str | None) -> None:
    with Outbox(tmp_path, database_url=database_url) as outbox:
        assert outbox.enqueue([obj("1.1"), obj("1.2")], ["pacs", "web"], now=0) == 4
        assert outbox.enqueue([obj("1.1"), obj("1.2")], ["pacs", "web"], now=5) == 0
        assert len(outbox.all()) == 4
        files = sorted(p.name for p in (tmp_path / "outbox" / "objects").iterdir())
        assert files == ["1.1.dcm", "1.2.dcm"]  # no temp files left
        assert pydicom.dcmread(tmp_path / "outbox" / "objects" / "1.1.dcm").SOPInstanceUID == "1.1"


def test_delivers_and_survives_restart(tmp_path: Path, database_url: str | None) -> None:
    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1")], ["pacs"], now=0)
        rows = outbox.claim_due("pacs", 0, 10)
        assert [r.state for r in rows] == [DeliveryState.PENDING]  # as read before the claim
    # the sender died while 'sending': a new process takes the row up again
    with Outbox(tmp_path, database_url=database_url) as outbox:
        sender = FakeSender()
        now = 1.0
        # Opening an outbox touches no row: a running sender may be at it.
        assert states(outbox)[("1.1", "pacs")] == DeliveryState.SENDING
        if database_url is None:  # the node's senders, starting, are the only senders
            assert outbox.release_interrupted() == 1
            assert states(outbox)[("1.1", "pacs")] == DeliveryState.PENDING
        else:  # shared: another sender may still be at it, so the row waits until stale
            assert outbox.release_interrupted() == 0
            assert deliver_due(outbox, RULES, now, send=sender).delivered == 0
            now = SENDING_STALE_S + 1.0
        counts = deliver_due(outbox, RULES, now, send=sender, rng=random.Random(0))
        assert counts.delivered == 1 and sender.calls == [("pacs", ["1.1"])]
        assert states(outbox)[("1.1", "pacs")] == DeliveryState.DELIVERED
        assert deliver_due(outbox, RULES, now + 1, send=sender).delivered == 0  # nothing twice


def test_down_destination_does_not_block_the_other(
    tmp_path: Path, database_url: str | None
) -> None:
    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1"), obj("1.2")], ["pacs", "web"], now=0)
        sender = FakeSender(down=frozenset({"pacs"}))
        with capture_logs() as logs:
            counts = deliver_due(outbox, RULES, 0.0, send=sender, rng=random.Random(0))
        assert counts.delivered == 2 and counts.retrying == 2 and counts.unreachable == ("pacs",)
        s = states(outbox)
        assert s[("1.1", "web")] == s[("1.2", "web")] == DeliveryState.DELIVERED
        assert s[("1.1", "pacs")] == DeliveryState.PENDING
        pacs_rows = [r for r in outbox.all() if r.destination == "pacs"]
        assert all(8.0 <= r.next_attempt_at <= 12.0 for r in pacs_rows)  # 10 s +-20 %
        assert all(
            r.attempts == 1 and "cannot be reached" in (r.last_error or "") for r in pacs_rows
        )
        attempts = [e for e in logs if e["event"] == "delivery_attempt"]
        assert {(e["destination"], e["object_kind"], e["attempt"]) for e in attempts} == {
            ("pacs", "sc", 1),
            ("web", "sc", 1),
        }
        assert "Secret" not in repr(logs)
        # not due yet: nothing is tried
        sender.calls.clear()
        deliver_due(outbox, RULES, 5.0, send=sender)
        assert sender.calls == []
        # back up: delivered on the next due pass
        sender.down.clear()
        counts = deliver_due(outbox, RULES, 13.0, send=sender)
        assert counts.delivered == 2
        assert set(states(outbox).values()) == {DeliveryState.DELIVERED}


def test_dead_letter_after_max_attempts_and_requeue(
    tmp_path: Path, database_url: str | None
) -> None:
    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1")], ["pacs"], now=0)
        sender = FakeSender(down=frozenset({"pacs"}))
        now = 0.0
        for _ in range(3):
            deliver_due(outbox, RULES, now, send=sender, rng=random.Random(0))
            now += 1000
        (row,) = outbox.all()
        assert row.state == DeliveryState.DEAD and row.attempts == 3
        assert deliver_due(outbox, RULES, now, send=sender) == deliver_due(
            outbox, RULES, now, send=sender
        )
        assert len(sender.calls) == 3  # dead rows are not tried
        assert outbox.requeue(now=now, destination="web") == 0
        assert outbox.requeue(now=now) == 1
        (row,) = outbox.all()
        assert row.state == DeliveryState.PENDING and row.attempts == 0
        sender.down.clear()
        assert deliver_due(outbox, RULES, now, send=sender).delivered == 1


def test_permanent_failure_goes_dead_at_once_retryable_backs_off(
    tmp_path: Path, database_url: str | None
) -> None:
    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1"), obj("1.2"), obj("1.3")], ["pacs"], now=0)
        sender = FakeSender(refuse={"1.1": False, "1.2": True})
        counts = deliver_due(outbox, RULES, 0.0, send=sender, rng=random.Random(0))
        assert (counts.delivered, counts.retrying, counts.dead) == (1, 1, 1)
        s = states(outbox)
        assert s[("1.1", "pacs")] == DeliveryState.DEAD
        assert s[("1.2", "pacs")] == DeliveryState.PENDING
        row = next(r for r in outbox.all() if r.sop_uid == "1.2")
        assert row.last_status_code == 0xA700


def test_unknown_destination_rows_are_parked_and_logged_once(
    tmp_path: Path, database_url: str | None
) -> None:
    with Outbox(tmp_path, database_url=database_url) as outbox, capture_logs() as logs:
        outbox.enqueue([obj("1.1")], ["gone"], now=0)
        sender = FakeSender()
        for t in range(1, 50):
            assert deliver_due(outbox, RULES, float(t), send=sender).delivered == 0
        assert sender.calls == [] and states(outbox)[("1.1", "gone")] == DeliveryState.PARKED
        unknown = [e for e in logs if e["event"] == "outbox_unknown_destination"]
        assert len(unknown) == 1 and unknown[0]["count"] == 1
        # The destination is back in the rules: its rows are pending again.
        assert outbox.park_unknown(["gone"], now=60.0) == {}
        assert states(outbox)[("1.1", "gone")] == DeliveryState.PENDING


def test_previous_sr(tmp_path: Path, database_url: str | None) -> None:
    sr = SR_SOP_CLASS_UIDS["comprehensive3d"]
    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1", sr), obj("1.2")], ["pacs"], now=0)
        outbox.enqueue([obj("1.3", sr)], ["pacs"], now=10)
        assert (
            outbox.previous_sr("1.2.3", exclude_sop_uid="1.3")
            == tmp_path / "outbox" / "objects" / "1.1.dcm"
        )
        assert (
            outbox.previous_sr("1.2.3", exclude_sop_uid="1.9")
            == tmp_path / "outbox" / "objects" / "1.3.dcm"
        )
        assert outbox.previous_sr("9.9", exclude_sop_uid="1.3") is None


def test_cmd_requeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "spool"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        f"storage:\n  spool_dir: {spool}\nmodels_dir: {tmp_path}\ndestinations:\n"
        "  - {kind: dicom, name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104}\n"
    )
    args = RequeueArgs(rules=rules_file, destination=None, study=None, only=None)
    assert cmd_requeue(args) == 0
    assert "0 deliveries requeued" in capsys.readouterr().out
    with Outbox(spool) as outbox:
        outbox.enqueue([obj("1.1"), obj("1.2")], ["pacs"], now=0)
        for row in outbox.claim_due("pacs", 0, 10):
            outbox.mark_failed(
                row,
                error="x",
                status_code=None,
                retryable=False,
                settings=DELIVERY,
                now=0,
                rng=random.Random(0),
            )
    assert cmd_requeue(args) == 0
    assert "2 deliveries requeued" in capsys.readouterr().out
    with Outbox(spool) as outbox:
        assert set(states(outbox).values()) == {DeliveryState.PENDING}
    from node.cli import main

    assert main(["requeue", "--rules", str(rules_file), "--destination", "pacs"]) == 0
    assert "0 deliveries requeued for pacs" in capsys.readouterr().out
    assert main(["requeue", "--rules", str(rules_file), "--destination", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "no destination 'nosuch'" in err and "pacs" in err


def test_unreadable_object_dead_letters_alone(tmp_path: Path, database_url: str | None) -> None:
    from node.deliver.send import send_dicom

    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1"), obj("1.2")], ["pacs"], now=0)
        (tmp_path / "outbox" / "objects" / "1.1.dcm").write_bytes(b"garbage")
        stored: list[str] = []

        class Assoc:
            accepted_sop_classes = frozenset({SC_SOP_CLASS_UID})

            def store(self, dataset: Dataset) -> int:
                stored.append(str(dataset.SOPInstanceUID))
                return 0

            def release(self) -> None:
                pass

        def send(dest: DicomDestination | DicomWebDestination, paths: Sequence[Path]):  # type: ignore[no-untyped-def]
            assert isinstance(dest, DicomDestination)
            return send_dicom(dest, paths, calling_ae="NEURONODE", connect=lambda *a: Assoc())

        counts = deliver_due(outbox, RULES, 0.0, send=send, rng=random.Random(0))
        assert (counts.delivered, counts.dead, counts.unreachable) == (1, 1, ())
        assert stored == ["1.2"]
        s = states(outbox)
        assert s[("1.1", "pacs")] == DeliveryState.DEAD
        assert s[("1.2", "pacs")] == DeliveryState.DELIVERED


def test_destinations_are_sent_in_parallel(tmp_path: Path, database_url: str | None) -> None:
    """A destination stuck in its connect timeout does not hold up the other one."""
    import threading

    web_done = threading.Event()
    seen_by_pacs: list[bool] = []

    def send(
        dest: DicomDestination | DicomWebDestination, paths: Sequence[Path]
    ) -> tuple[SendResult, ...]:
        if dest.name == "pacs":  # "hangs" until the web destination has been served
            seen_by_pacs.append(web_done.wait(timeout=5))
            raise SendError("destination pacs cannot be reached", retryable=True)
        web_done.set()
        return FakeSender()(dest, paths)

    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1")], ["pacs", "web"], now=0)
        counts = deliver_due(outbox, RULES, 0.0, send=send, rng=random.Random(0))
    assert seen_by_pacs == [True]  # web finished while pacs was still trying
    assert counts.delivered == 1 and counts.unreachable == ("pacs",)


def test_read_only_views_read_the_same_outbox(tmp_path: Path, database_url: str | None) -> None:
    from node.web.views import delivery_states, study_deliveries

    assert delivery_states(tmp_path, ["1.2.3"], database_url=database_url) == {}
    with Outbox(tmp_path, database_url=database_url) as outbox:
        outbox.enqueue([obj("1.1"), obj("1.2")], ["pacs"], now=0)
        outbox.enqueue([obj("2.1", study="1.2.4")], ["pacs"], now=0)
    assert delivery_states(tmp_path, ["1.2.3"], database_url=database_url) == {
        "1.2.3": {"pending": 2}
    }
    [view] = study_deliveries(tmp_path, "1.2.3", database_url=database_url)
    assert (view.name, view.pending, view.sent) == ("pacs", 2, 0)
    assert outbox_summary(tmp_path, database_url=database_url)["pacs"]["pending"] == 3
    assert outbox_study_uids(tmp_path, database_url=database_url) == {"1.2.3", "1.2.4"}
