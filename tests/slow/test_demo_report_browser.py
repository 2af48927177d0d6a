"""The smoke demo's report.html opens in headless Chromium and every embedded image loads.

Needs Debian's `chromium` package: `apt-get update && apt-get install -y chromium`. Without Chromium this
test fails; it does not skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from prefalign.cli import main

CHROMIUM_HELP = "headless Chromium is needed: apt-get update && apt-get install -y chromium"

PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images).map(
    img => ({alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight}));
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(CHROMIUM_HELP)


def test_report_images_load_in_headless_chromium(tmp_path):
    run = tmp_path / "run"
    assert main(["demo", "--preset", "smoke", "--output", str(run), "--no-progress"]) == 0
    report = (run / "report.html").read_text()
    assert PROBE not in report
    # The probe goes into a copy, so that the report itself stays script-free.
    page = tmp_path / "probe.html"
    page.write_text(report.replace("</body>", PROBE + "</body>"))
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert found, "the page's load event never ran the probe"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert [i["alt"] for i in images] == ["frontier", "dpo_curves", "ppo_curves"]
    for image in images:
        assert image["complete"] and image["width"] > 200 and image["height"] > 100, image
    assert "prefalign demo: controlled sentiment" in proc.stdout
