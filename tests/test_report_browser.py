"""The report in a real browser: headless Chromium renders the pages offline and fetches nothing.

Each page is loaded from file:// with DNS mapped to nowhere and a NetLog
recorded. Chromium itself contacts Google services in the background (initiator
"not an origin"); a request the *page* makes carries the file:// origin in its
network isolation key, and that is what must never happen. A control page with
one remote image shows the check can fail. Large CSVs, embedded gzip-compressed,
are decompressed by the page's own script (the ``#check-downloads`` self-check) and
compared with the data. Screenshots are kept in pytest's temporary folder and checked
to be real renderings on a white background. Skipped where Chromium is absent
(``make test`` installs it where apt-get is available, as in CI).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from reports import html as report_html
from reports.build import build_report
from simulations.coefficients import CoefficientsConfig
from simulations.toy_optimisation import ToyOptimisationConfig

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--window-size=1280,2000",
)


def chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{page.stem}"
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def page_requests(net_log: Path) -> list[str]:
    """URLs of network requests made by a file:// page (not by the browser's own services)."""
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] == start_job and "file://" in params.get("network_isolation_key", ""):
            urls.append(params.get("url", "?"))
    return urls


def render(page: Path, tmp_path: Path) -> tuple[str, list[str], Path]:
    """DOM after load, page-initiated network requests, and a screenshot path."""
    net_log = tmp_path / f"{page.stem}-netlog.json"
    dom = chromium(page, tmp_path, "--dump-dom", f"--log-net-log={net_log}").stdout
    screenshot = tmp_path / f"{page.stem}.png"
    chromium(page, tmp_path, f"--screenshot={screenshot}")
    return dom, page_requests(net_log), screenshot


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    base = tmp_path_factory.mktemp("browser")
    configs = {
        "coefficients": CoefficientsConfig(ns=(4, 8), drop_ratios=(0.1, 0.5), num_samples=200, num_repeats=3),
        "toy_optimisation": ToyOptimisationConfig(
            n_problems=32, n_keys=4, steps=40, n_records=8, drop_ratios=(0.1, 0.5), covariance_samples=50
        ),
    }
    with pytest.MonkeyPatch.context() as patch:  # force the gzip path for the results CSVs
        patch.setattr(report_html, "MAX_EMBEDDED_CSV_BYTES", 20_000)
        build_report(base / "out", configs=configs, cache_dir=base / "cache", results_dir=base)
    return base / "out"


@pytest.mark.parametrize("name", ["index", "coefficients"])
def test_page_renders_offline_with_figures_and_tables(report, tmp_path, name):
    dom, requests, screenshot = render(report / f"{name}.html", tmp_path)
    assert "<table" in dom
    if name != "index":
        assert "<svg" in dom and "<img" in dom
    for target in re.findall(r"""(?:src|href)="([^"]*)\"""", dom):
        assert target.startswith("data:") or re.fullmatch(r"[\w.-]*\.html(#[\w.-]+)?|#[\w.-]+", target), target[:80]
    assert requests == [], f"the page fetched {requests}"
    pixels = matplotlib.image.imread(screenshot)[..., :3]
    white = (pixels > 0.97).all(axis=-1).mean()
    assert 0.5 < white < 0.995, f"screenshot is {white:.1%} white: blank or not on a white background"


def test_embedded_gzip_csv_decompresses_in_the_browser(report, tmp_path):
    page = report / "coefficients.html"
    text = page.read_text(encoding="utf-8")
    assert "data-gzip-csv" in text, "the fixture should have forced a compressed download"
    target = page.resolve().as_uri() + "#check-downloads"
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
               "--dump-dom", target]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    checks = dict(re.findall(r'<pre class="csv-check" data-file="([^"]+)">([^<]*)</pre>', dom))
    assert "coefficients-results.csv" in checks, dom[-2000:]
    lines, header = checks["coefficients-results.csv"].split("; ", 1)
    cached = pd.read_csv(next((report.parent / "cache" / "coefficients").glob("*/results.csv")))
    assert header == ",".join(cached.columns)
    assert int(lines.split()[0]) == len(cached) + 1  # header + one line per row


def test_the_network_check_detects_a_remote_resource(report, tmp_path):
    control = tmp_path / "control.html"
    control.write_text('<html><body><img src="http://example.test/x.png"></body></html>', encoding="utf-8")
    _, requests, _ = render(control, tmp_path)
    assert any("example.test" in url for url in requests)
