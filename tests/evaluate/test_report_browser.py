"""The report as a person sees it: rendered by a real browser (Debian's chromium, headless) from a file:// URL."""

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from medsight.evaluate.report import REPORT_HTML, ValidationOptions, validate, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; listed in .ci/apt-packages.txt)")
def test_report_renders_in_headless_chromium(tiny_package, tiny_npz, tmp_path):
    result = validate(tiny_package, tiny_npz, "test", ValidationOptions(n_boot=40, gallery_size=2, subgroups=["intensity_tertile"], min_cases=5))
    html, _ = write_report(result, tmp_path / "rep")
    shot = tmp_path / "shot.png"
    # offline: no network, no profile; the HTML must render from the file alone
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,4000",
           html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (4000, 1280)
    # not blank: plenty of ink, and the figures (mid-grey/colour areas) are drawn, in every quarter of the page
    dark = img < 200
    assert dark.mean() > 0.03
    for quarter in np.array_split(img, 4):
        assert (quarter < 200).mean() > 0.01 and quarter.std() > 20
    assert (tmp_path / "rep" / REPORT_HTML).stat().st_size < 2_000_000  # self-contained yet small
