"""The SR reaches a real Orthanc before its heatmaps, and a crash between them costs nothing:
the retried job sends the heatmaps and never a second SR."""

# ruff: noqa: F811  (fixtures are imported by name and used as arguments)

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.config import DicomDestination
from node.deliver.outbox import Outbox, deliver_due
from node.pipeline.context import Stage
from node.pipeline.runner import process_study
from node.records import DeliveryState
from tests.integration.orthanc import (  # noqa: F401 - fixtures
    OrthancServer,
    orthanc,
    orthanc_factory,
)
from tests.unit.test_pipeline_stages import (  # noqa: F401 - fixture
    COMPREHENSIVE_3D_SR,
    SECONDARY_CAPTURE,
    _audit,
    _job,
    _paths,
    _rules,
    world,
)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]


class _Killed(BaseException):
    """The worker dying at a stage (escapes the per-job guard, as a SIGKILL would)."""


def test_a_crash_after_the_sr_went_out_ends_with_every_object_in_orthanc_once(
    world: dict[str, Any], orthanc: OrthancServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    dest = DicomDestination(
        name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
    )
    rules = _rules(
        world,
        destinations=[dest.model_dump(mode="json")],
        storage={"spool_dir": str(spool)},
        outputs={"heatmaps_per_series": 2},
    )
    out = spool / "results"
    sent: list[int] = []

    def send_now() -> None:  # what the node's senders do when a job says it queued results
        with Outbox(spool) as outbox:
            sent.append(deliver_due(outbox, rules, now=1e12).delivered)

    def die_at_heatmaps(stage: Stage) -> None:
        if stage is Stage.HEATMAPS:
            raise _Killed

    with pytest.raises(_Killed):
        process_study(
            _job(world, _paths(world)),
            rules,
            out_dir=out,
            deliver=True,
            on_stage=die_at_heatmaps,
            on_queued=send_now,
        )
    assert sent == [1]
    stored = orthanc.by_sop_uid()
    assert [t["SOPClassUID"] for t in stored.values()] == [COMPREHENSIVE_3D_SR]  # the SR alone
    sr_uid = next(iter(stored))

    process_study(  # the retry
        _job(world, _paths(world), attempt=2), rules, out_dir=out, deliver=True, on_queued=send_now
    )
    made = {o["sop_instance_uid"]: o["kind"] for o in _audit(out, world)["objects"]}
    n_sc = sum(1 for kind in made.values() if kind == "sc")
    assert n_sc >= 2 and sent == [1, 0, n_sc]  # the SR is not sent again
    stored = orthanc.by_sop_uid()
    assert set(stored) == set(made) and len(orthanc.instances()) == 1 + n_sc
    assert sorted(t["SOPClassUID"] for t in stored.values()) == sorted(
        [COMPREHENSIVE_3D_SR] + [SECONDARY_CAPTURE] * n_sc
    )
    assert made[sr_uid] == "sr"
    with Outbox(spool) as outbox:
        rows = outbox.all()
    assert {r.state for r in rows} == {DeliveryState.DELIVERED}
    assert all(r.attempts == 1 for r in rows) and len(rows) == 1 + n_sc
