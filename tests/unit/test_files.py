"""Durable writes (node/store/files.py): several files with one folder sync, and second names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.store import files
from node.store.files import link_files_durable, write_files_durable


def _count_dir_syncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    synced: list[Path] = []
    real = files.fsync_dir

    def record(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(files, "fsync_dir", record)
    return synced


def test_several_files_are_written_whole_with_one_sync_per_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "new" / "objects"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.dcm").write_bytes(b"old")
    synced = _count_dir_syncs(monkeypatch)
    write_files_durable(
        [
            (folder / "a.dcm", b"A" * 1000),
            (tmp_path / "other" / "b.dcm", b"new"),
            (folder / "c.dcm", b"C"),
        ]
    )
    assert (folder / "a.dcm").read_bytes() == b"A" * 1000
    assert (folder / "c.dcm").read_bytes() == b"C"
    assert (tmp_path / "other" / "b.dcm").read_bytes() == b"new"  # replaced
    assert not list(tmp_path.rglob("*.part"))
    # After the renames: each destination folder once (not once per file).
    renamed = synced[-2:]
    assert renamed == [folder, tmp_path / "other"]
    assert synced.count(folder) == 1


def test_a_failed_write_leaves_no_temp_files_and_no_new_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = files.write_temp_durable

    def fail_second(folder: Path, data: bytes) -> Path:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(folder, data)

    monkeypatch.setattr(files, "write_temp_durable", fail_second)
    with pytest.raises(OSError):
        write_files_durable([(tmp_path / "a.dcm", b"A"), (tmp_path / "b.dcm", b"B")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_second_name_shares_the_file_and_an_existing_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_files_durable([(tmp_path / "a.dcm", b"A"), (tmp_path / "b.dcm", b"B")])
    out = tmp_path / "outbox" / "objects"
    out.mkdir(parents=True)
    (out / "b.dcm").write_bytes(b"queued before")
    synced = _count_dir_syncs(monkeypatch)
    link_files_durable([(tmp_path / "a.dcm", out / "a.dcm"), (tmp_path / "b.dcm", out / "b.dcm")])
    assert os.stat(out / "a.dcm").st_ino == os.stat(tmp_path / "a.dcm").st_ino  # no copy
    assert (out / "b.dcm").read_bytes() == b"queued before"
    assert synced == [out]


def test_a_second_name_is_a_durable_copy_where_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_files_durable([(tmp_path / "a.dcm", b"A" * 10)])

    def no_links(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    link_files_durable([(tmp_path / "a.dcm", tmp_path / "q" / "a.dcm")])
    copy = tmp_path / "q" / "a.dcm"
    assert copy.read_bytes() == b"A" * 10
    assert os.stat(copy).st_ino != os.stat(tmp_path / "a.dcm").st_ino
    assert not list(tmp_path.rglob("*.part"))
