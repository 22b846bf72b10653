"""The web UI in a real browser: Debian's Chromium driven by Playwright against a real `medsight serve`.

Log in, upload a real DICOM (pydicom-data's RG1_J2KR.dcm, an adult chest CR in
JPEG 2000) as STAT, watch it rise to the top of the worklist once the worker has
analysed it, open it, toggle the heat map and change its opacity, submit a
review, log out. Screenshots go to $MEDSIGHT_SCREENSHOTS (default: the test's
temporary folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
PASSWORD = "reading-room-2025"

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path, models_dir: Path, shape_pngs):  # noqa: ANN001, ANN201
    from medsight.serve.auth import create_user
    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext
    from medsight.serve.worker import Worker

    port = _free_port()
    settings = ServiceSettings(data_dir=tmp_path / "data", model_paths=[models_dir], default_models={"CR": "tiny-xr"}, use_zoo=False,
                               public_url=f"http://127.0.0.1:{port}", poll_seconds=0.2)
    ctx = ServiceContext.build(settings)
    with ctx.db.session() as s:
        create_user(s, "dr.lee", PASSWORD, "radiologist", "Dr. Ada Lee")
        create_user(s, "tech.kim", PASSWORD, "technologist", "Sam Kim")
    ctx.close()
    path = settings.write_json(tmp_path / "settings.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSIGHT_")}
    # The web server is a real `medsight serve` process; the worker runs in this process (saves a second
    # torch start-up; the worker subprocess path is covered by the kill -9 test).
    proc = subprocess.Popen([sys.executable, "-m", "medsight.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--settings", str(path), "--workers", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    worker_ctx = ServiceContext.build(settings)
    worker = Worker(worker_ctx, name="browser-test-worker")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    while time.monotonic() < end:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
    # Two routine studies already waiting, so "ranked" means something.
    tok = httpx.post(f"{base}/api/auth/login", json={"username": "tech.kim", "password": PASSWORD}).json()["token"]
    for k, lab in enumerate(("bar", "disc")):
        r = httpx.post(f"{base}/api/studies", headers={"Authorization": f"Bearer {tok}"},
                       files=[("files", (f"{lab}.png", shape_pngs[lab][0], "image/png"))],
                       data={"modality": "CR", "accession_number": f"RT-{k + 1:03d}"})
        assert r.status_code == 202, r.text
    yield base
    worker.stop()
    thread.join(60)
    worker_ctx.close()
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_radiologist_workflow_in_chromium(server: str, tmp_path: Path) -> None:
    pw = pytest.importorskip("playwright.sync_api", reason="pip package 'playwright' not installed")
    from medsight.io.samples import sample_path

    dicom = sample_path({"pydicom_data": "RG1_J2KR.dcm"})
    shots = Path(os.environ.get("MEDSIGHT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"{server}/worklist")
        assert "/login" in page.url  # not logged in: sent to the login page
        page.fill("#username", "dr.lee")
        page.fill("#password", PASSWORD)
        page.click("#login")
        page.wait_for_url("**/worklist")
        page.screenshot(path=str(shots / "01-worklist-before.png"))

        page.click("text=Upload")
        page.set_input_files("#files", str(dicom))
        page.select_option("#priority", "stat")
        page.fill("#accession", "CXR-0042")
        page.click("#upload")
        page.wait_for_url("**/studies/*")
        study_url = page.url
        page.locator("#finding").wait_for()  # the page reloads itself until the worker has analysed the study

        page.click("text=Worklist")
        page.wait_for_url("**/worklist")
        first = page.locator("#rows tr").first
        first.locator("text=CXR-0042").wait_for()  # STAT: ranked first
        assert "u-high" in (first.get_attribute("class") or "")  # red urgency band
        assert page.locator("#rows tr").count() == 3
        page.screenshot(path=str(shots / "02-worklist-ranked.png"))

        first.locator("a").first.click()
        page.wait_for_url(study_url)
        overlay = page.locator("#overlay")
        overlay.wait_for(state="visible")
        page.wait_for_function("document.getElementById('overlay').complete && document.getElementById('overlay').naturalWidth > 0")
        assert page.evaluate("document.getElementById('base').naturalWidth") == 1841  # shown at its own resolution
        page.uncheck("#toggle-heatmap")
        assert overlay.is_hidden()
        page.check("#toggle-heatmap")
        assert overlay.is_visible()
        page.locator("#opacity").fill("80")
        assert overlay.evaluate("e => e.style.opacity") == "0.8"
        assert page.inner_text("#opacity-value") == "80%"
        page.screenshot(path=str(shots / "03-study-heatmap.png"))

        model_label = page.inner_text("#finding").strip()
        other = "bar" if model_label == "disc" else "disc"
        page.check(f"input[name=label][value={other}]")  # correct the model
        page.fill("#note", "Adult chest film; phantom model output not applicable.")
        page.click("#submit-review")
        page.locator("#saved").wait_for()
        assert "correct" in page.inner_text("#reviews") and "Dr. Ada Lee" in page.inner_text("#reviews")
        page.screenshot(path=str(shots / "04-study-reviewed.png"), full_page=True)

        page.click("#logout")
        page.wait_for_url("**/login")
        page.goto(f"{server}/worklist")
        assert "/login" in page.url  # the session is gone
        browser.close()
    for name in ("01-worklist-before.png", "02-worklist-ranked.png", "03-study-heatmap.png", "04-study-reviewed.png"):
        assert (shots / name).stat().st_size > 10_000
    shutil.copy(shots / "03-study-heatmap.png", tmp_path / "readme.png")
