"""The benchmarks return sane records on tiny inputs (no timing assertions: figures are printed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from node.cli import build_parser
from node.errors import ConfigError
from node.ingest.spool import SyncOrder
from node.lab.bench import (
    BENCHMARKS,
    BenchRecord,
    BenchSettings,
    BenchStudy,
    as_json,
    bench_specialists,
    format_line,
    format_table,
    make_study,
    peak_memory,
    run_benchmarks,
    timed,
)
from node.records import SequenceLabel

TINY = BenchSettings(size=64, slices=8, n_instances=5, repeat=1)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> BenchStudy:
    return make_study(tmp_path_factory.mktemp("bench"), TINY)


def _check_ratio(r: BenchRecord) -> None:
    assert r.figure > 0 and r.reference is not None and r.reference > 0
    assert r.ratio is not None and r.ratio > 0


def test_timed_returns_median_and_last_result() -> None:
    calls: list[int] = []

    def fn() -> int:
        calls.append(1)
        return len(calls)

    seconds, result = timed(fn, 3)
    assert len(calls) == 3 and result == 3 and seconds >= 0


def test_peak_memory_sees_a_large_allocation() -> None:
    with peak_memory() as peak:
        block = bytearray(64 * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        del block
    assert peak.max_rss_mb > 0
    if peak.mb is not None:  # Linux with /proc/self/clear_refs
        assert peak.growth_mb is not None and peak.growth_mb >= 48
        assert peak.mb >= peak.growth_mb


def test_make_study_writes_six_routed_series(tiny_study: BenchStudy) -> None:
    labels = {label for _, label in tiny_study.labels}
    assert tiny_study.n_series == 6
    assert labels == {SequenceLabel(x) for x in ("T1", "T1C", "T2", "FLAIR", "DWI", "ADC")}
    assert all(p.is_file() for p in tiny_study.paths)
    assert len(tiny_study.paths) == 7 * TINY.slices  # DWI holds b=0 and b=1000


@pytest.mark.slow
def test_benchmarks_return_sane_records(tmp_path: Path) -> None:
    names = ("synth", "sequence", "receive", "dicomio")
    records = run_benchmarks(names, tmp_path, TINY)
    by_name = {r.name: r for r in records}
    assert tuple(by_name) == names
    synth = by_name["synth"]
    _check_ratio(synth)
    details = dict(synth.details)
    assert details["series"] == 6 and details["files"] == 7 * TINY.slices
    assert synth.met is not None and synth.unit == "s"
    seq = by_name["sequence"]
    if seq.skipped:  # the sequence bundle is not installed in this tree
        assert "sequence bundle" in seq.skipped
    else:
        _check_ratio(seq)
        d = dict(seq.details)
        # up to 9 slices voted per series (the default rules); DWI holds two b-values
        assert d["series"] == 6 and 6 * TINY.slices <= int(d["cnn_images"]) <= 6 * 9
        assert float(d["cnn_images_per_s"]) > 0
    rx = by_name["receive"]
    _check_ratio(rx)
    assert dict(rx.details)["files_in_spool"] == TINY.n_instances
    assert rx.unit == "instances/s"
    io = by_name["dicomio"]
    _check_ratio(io)
    assert dict(io.details)["volumes"] == 6 and dict(io.details)["problems"] == 0
    assert abs(io.ratio - io.figure / io.reference) < 0.05 * io.ratio + 0.01  # type: ignore[operator]
    text = json.dumps(as_json(records, {"cpu_count": 2}))
    assert json.loads(text)["records"][0]["name"] == "synth"


def test_specialists_skip_missing_bundles_and_say_why(
    tiny_study: BenchStudy, tmp_path: Path
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    settings = BenchSettings(size=64, slices=8, models_dir=empty)
    records = bench_specialists(tiny_study, tmp_path, settings)
    assert records[-1].name == "pipeline"
    assert records[-1].skipped == "no specialist bundle loads"
    models = [r for r in records if r.name.startswith("model:")]
    assert {r.name for r in models} >= {"model:gbm_pcnsl_t1c", "model:tubers_flair"}
    assert all("directory not found" in r.skipped for r in models)
    assert all(r.figure == 0 for r in records)


def test_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown benchmark 'speed'"):
        run_benchmarks(("speed",), tmp_path, TINY)


def test_lines_and_table_show_figure_reference_ratio_and_target() -> None:
    r = BenchRecord(
        name="synth",
        figure=1.5,
        unit="s",
        reference=0.5,
        reference_what="plain writes",
        ratio=3.0,
        ratio_what="a / b",
        target="< 5 s",
        met=True,
        peak_mb=700.0,
        growth_mb=12.0,
        details=(("files", 168),),
    )
    skipped = BenchRecord(
        name="model:x",
        figure=0.0,
        unit="",
        reference=None,
        reference_what="",
        ratio=None,
        ratio_what="",
        skipped="directory not found",
    )
    line = format_line(r)
    assert "1.500 s" in line and "0.500 s" in line and "3.000" in line and "met" in line
    assert "files=168" in line and "700 MB (+12 MB)" in line
    assert format_line(skipped) == f"{'model:x':<28} skipped: directory not found"
    table = format_table((r, skipped))
    assert table.splitlines()[2].startswith("synth") and "skipped" in table.splitlines()[3]


def test_cli_bench_options() -> None:
    args = build_parser().parse_args(
        ["bench", "--only", "synth", "--only", "receive", "--repeat", "3", "--out", "f.json"]
    )
    assert args._command.name == "bench" and args._command.args.__name__ == "BenchArgs"
    assert args.only == ["synth", "receive"] and args.repeat == 3 and args.out == Path("f.json")
    assert set(args.only) <= set(BENCHMARKS)
    assert args.ingest_instances == 200  # `ingest`'s default; issue 15 measured 600
    args = build_parser().parse_args(["bench", "--only", "ingest", "--ingest-instances", "600"])
    assert args.only == ["ingest"] and args.ingest_instances == 600 and "ingest" in BENCHMARKS


@pytest.mark.slow
def test_ingest_benchmark_compares_the_node_with_orthanc(tmp_path: Path) -> None:
    from node.lab.orthanc import orthanc_binary, system_tool

    if orthanc_binary() is None or system_tool("storescu") is None:
        pytest.skip("Orthanc or dcmtk is not installed")
    settings = BenchSettings(ingest_instances=8, ingest_size=64, nagle_size=48, repeat=1)
    records = {r.name: r for r in run_benchmarks(("ingest",), tmp_path, settings)}
    assert set(records) == {"ingest:1_assoc", "ingest:4_assoc", "ingest:stock_sender"}
    for name in ("ingest:1_assoc", "ingest:4_assoc"):
        r = records[name]
        _check_ratio(r)
        assert r.met is (r.figure >= (r.reference or 0))
        details = dict(r.details)
        assert details["rounds"] == 3 and details["instances"] == 8
        assert float(details["storescp_no_fsync_per_s"]) > 0
        assert float(details["instances_per_group_commit"]) >= 1
        assert details["sync_order"] in {o.value for o in SyncOrder}
        assert float(details["node_cpu_ms_per_instance"]) > 0
        assert float(details["orthanc_cpu_ms_per_instance"]) > 0
    assert dict(records["ingest:1_assoc"].details)["associations"] == 1
    assert dict(records["ingest:4_assoc"].details)["associations"] == 4
    stock = records["ingest:stock_sender"]
    _check_ratio(stock)
    assert dict(stock.details)["matrix"] == "48x48"
    assert "ingest" in format_table(tuple(records.values()))


def test_latency_details_give_the_median_stage_times_to_the_sr(tmp_path: Path) -> None:
    from node.lab.bench_latency import _stage_line, _stage_times, _to_sr_total

    runs = []
    for i, (load, infer) in enumerate(((400.0, 900.0), (500.0, 1100.0), (450.0, 1000.0))):
        spool = tmp_path / f"spool{i}"
        (spool / "results" / "abc").mkdir(parents=True)
        stages = [
            {"stage": "load", "duration_ms": load, "cpu_ms": load / 2},
            {"stage": "infer", "duration_ms": infer, "cpu_ms": None},
            {"stage": "heatmaps", "duration_ms": 700.0, "cpu_ms": 600.0},
        ]
        (spool / "results" / "abc" / "audit.json").write_text(json.dumps({"stages": stages}))
        runs.append(_stage_times(spool))
    walls = [w for w, _ in runs]
    cpus = [c for _, c in runs]
    assert _stage_line(walls) == "load 450 infer 1000"  # medians, SR stages in pipeline order
    assert _stage_line(cpus) == "load 225"  # no CPU recorded for infer
    assert _stage_line(walls, ("heatmaps",)) == "heatmaps 700"
    assert _to_sr_total(walls) == 1.45  # heatmaps come after the SR: not counted
    assert _to_sr_total([]) == 0.0
