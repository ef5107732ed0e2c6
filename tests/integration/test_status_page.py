"""The status page in a real browser: a real node, a real Orthanc, headless Debian chromium.

A `neuronode serve` with the real pipeline delivers to an Orthanc that is not running yet, with
few delivery attempts, so its results go to the dead letter. dcmtk storescu pushes a synthetic
study; Selenium opens the page, finds the study, its findings and a heatmap that loaded, then
Orthanc is started, requeue is clicked on the dead delivery, and the SR is read back from
Orthanc's REST API. NEURONODE_SCREENSHOT_DIR=docs saves the page's screenshots there
(docs/status-page-*.png come from this test).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from PIL import Image

from node.lab.orthanc import OrthancServer, free_port, orthanc_binary
from tests.conftest import system_tool
from tests.integration.test_e2e_orthanc import E2ENode, _bundles, _storescu, _write_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH = 1200


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDTH},900")
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def _screenshot(driver: Any, path: Path) -> None:
    """The whole page as a small PNG (a 256-colour palette is plenty for a table page)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(WIDTH, min(max(height + 120, 600), 2400))
    png = driver.get_screenshot_as_png()
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    driver.set_window_size(WIDTH, 900)


def _wait(what: str, predicate: Any, node: E2ENode, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout_s} s\n{node.logs()[-4000:]}")


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[E2ENode, OrthancServer, int, str, Path, str]]:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    storescu = system_tool("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk)")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed")
    models, tasks, _source = _bundles(tmp_path)
    if not tasks:
        pytest.skip(f"no task bundle could be found or written in {models}")
    study_uid = _write_study(tmp_path / "study", 303, "gbm")
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    node = E2ENode(workdir=node_dir, port=free_port())
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node.port)  # not started yet
    http_port = free_port()
    node.extra = {
        "models_dir": str(models),
        "tasks": tasks,
        "sequence": {"disagreement": "prefer_tags"},
        "http": {"port": http_port},  # loopback, the default: no token
        "destinations": [
            {
                "kind": "dicom",
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        # Two quick attempts against the stopped Orthanc, then the dead letter.
        "delivery": {"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
    }
    node.start(timeout_s=90)
    try:
        yield node, orthanc, http_port, storescu, tmp_path / "study", study_uid
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
        orthanc.stop()


def test_status_page_in_chromium_requeue_a_dead_delivery(
    parts: tuple[E2ENode, OrthancServer, int, str, Path, str],
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    node, orthanc, http_port, storescu, folder, study_uid = parts
    shots = Path(os.environ.get("NEURONODE_SCREENSHOT_DIR") or node.workdir / "shots")
    first = next(iter(sorted(folder.rglob("*.dcm"))))
    patient = str(pydicom.dcmread(first, stop_before_pixels=True).PatientName)
    _storescu(storescu, folder, node.port, node.ae_title)

    def dead_letter() -> bool:
        rows = node.outbox_rows()
        return bool(rows) and all(state == "dead" for _, state, _ in rows)

    _wait("every delivery dead", dead_letter, node)
    audit = node.audits()[study_uid]
    assert audit["status"] == "done"
    sr_uids = {o["sop_instance_uid"] for o in audit["objects"] if o["kind"] == "sr"}
    all_uids = {o["sop_instance_uid"] for o in audit["objects"]}
    assert sr_uids and any(o["kind"] == "sc" for o in audit["objects"])

    driver = _browser()
    try:
        base = f"http://127.0.0.1:{http_port}"
        driver.get(base + "/")
        assert "NOT FOR CLINICAL USE" in driver.find_element(By.ID, "not-for-clinical-use").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#studies tr.study")
        assert len(rows) == 1
        assert "done" in rows[0].text
        _screenshot(driver, shots / "status-page-list.png")
        rows[0].find_element(By.TAG_NAME, "a").click()

        # A click that navigates may return before the next page is there: wait for it.
        wait = WebDriverWait(driver, 20)
        assert patient in wait.until(ec.presence_of_element_located((By.ID, "patient"))).text
        findings = driver.find_elements(By.CSS_SELECTOR, "#findings tr.finding")
        assert {f.get_attribute("data-task") for f in findings} == {
            f["task"] for f in audit["findings"]
        }
        first_finding = audit["findings"][0]
        if first_finding["probability"] is not None:
            assert f"{first_finding['probability']:.3f}" in findings[0].text
        images = driver.find_elements(By.CSS_SELECTOR, "img.heatmap")
        assert images
        loaded = [
            int(
                driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth", i
                )
            )
            for i in images
        ]
        assert all(w > 0 for w in loaded), loaded
        card = driver.find_element(By.CSS_SELECTOR, 'section.delivery[data-destination="orthanc"]')
        assert f"dead {len(all_uids)}" in card.text
        _screenshot(driver, shots / "status-page-study.png")

        orthanc.start()
        card.find_element(By.CSS_SELECTOR, "button.requeue-delivery").click()
        assert "requeued" in wait.until(ec.presence_of_element_located((By.ID, "notice"))).text

        def in_orthanc() -> bool:
            return all_uids <= orthanc.by_sop_uid().keys()

        _wait("the results in Orthanc", in_orthanc, node, timeout_s=60)
        stored = orthanc.by_sop_uid()
        for uid in sr_uids:
            assert stored[uid]["StudyInstanceUID"] == study_uid
            assert stored[uid]["Modality"] == "SR"

        def page_says_sent() -> bool:
            # Orthanc may hold the last object a moment before the node records it as sent.
            driver.refresh()
            card = driver.find_element(
                By.CSS_SELECTOR, 'section.delivery[data-destination="orthanc"]'
            )
            return f"sent {len(all_uids)}" in card.text and "dead 0" in card.text

        _wait("the page showing every object sent", page_says_sent, node, timeout_s=30)
        _screenshot(driver, shots / "status-page-study-sent.png")
    finally:
        driver.quit()
    assert patient not in node.logs()  # shown on the page, never logged
