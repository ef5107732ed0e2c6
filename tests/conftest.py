"""Shared test fixtures: free loopback ports, the real dcmtk/dicom3tools binaries, real data."""

from __future__ import annotations

import logging
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.data import get_testdata_file

# The one free-port helper is the lab's (it also starts the demo's Orthanc); re-exported here
# for the tests that still import it from tests.conftest.
from node.lab.orthanc import free_port as free_port
from node.store.db import upgrade_all
from tests.pg import PostgresServer
from tests.pg import skip_reason as pg_skip_reason

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"

# pynetdicom installs its own storescu/echoscu/findscu into the venv's bin/, which shadow
# dcmtk's on PATH: the tests want the real dcmtk tools, so look in the system dirs only.
_SYSTEM_BIN = "/usr/bin:/usr/local/bin:/bin"


def system_tool(name: str) -> str | None:
    """Path of a system (Debian) binary, ignoring the venv's bin/."""
    return shutil.which(name, path=_SYSTEM_BIN)


@pytest.fixture
def dcmtk() -> Callable[[str], str]:
    """Resolve a dcmtk tool (storescu, echoscu, findscu); skip if dcmtk is not installed."""

    def resolve(name: str) -> str:
        path = system_tool(name)
        if path is None:
            pytest.skip(f"dcmtk's {name} is not installed (apt-get install dcmtk)")
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
        assert "dcmtk" in (out.stdout + out.stderr).lower(), f"{path} is not dcmtk's {name}"
        return path

    return resolve


@pytest.fixture
def dciodvfy() -> str:
    """dicom3tools' validator; skip if not installed."""
    path = system_tool("dciodvfy")
    if path is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    return path


def pydicom_file(name: str) -> Path:
    """One of pydicom's bundled test files (MR_small.dcm ...), typed as a path."""
    found = get_testdata_file(name)
    assert isinstance(found, str), f"pydicom's test file {name} is not installed"
    return Path(found)


def small_mr_series(study_uid: str, n: int) -> list[pydicom.Dataset]:
    """`n` instances of pydicom's MR_small as one series of `study_uid` (series `<study>.1`,
    instances `<study>.1.<k>`, 1 mm apart)."""
    out: list[pydicom.Dataset] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, n + 1):
            ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = f"{study_uid}.1"
            ds.SOPInstanceUID = f"{study_uid}.1.{i}"
            ds.InstanceNumber = i
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
            out.append(ds)
    return out


@pytest.fixture
def realdata() -> Path:
    """The real scanner DICOM in ../shared/realdata (skip when absent)."""
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is not beside the repo")
    return REALDATA


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Undo node.log.configure() after each test: a level or stream set by one test (a CLI run
    at warning level) must not hide the log lines another test captures with capture_logs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


# --- PostgreSQL (tests/pg.py): one throwaway cluster per test session, a database per test ----


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL on a free loopback port for the whole session; skipped if missing."""
    reason = pg_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """Each index/queue/outbox test runs on both backends: None is the embedded SQLite, else
    the URL of a fresh, upgraded PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.new_database()
    upgrade_all(tmp_path, url)
    return url
