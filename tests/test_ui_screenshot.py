"""ops/ui_screenshot.py against a static page served here: the PNG has the requested size, and
an unreachable page, a missing Chromium and a selector that never appears each say so; and
against a real Dagster webserver of the project, --fit-graph fills the window with the lineage of
every asset group."""

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iiot_orchestration.dev import code_locations
from iiot_orchestration.services import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ops" / "ui_screenshot.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian package: chromium)"
)
PAGE = """<!doctype html><html><body style="margin:0">
<div style="height:1500px;background:#369">tall</div>
<script>setTimeout(() => document.body.insertAdjacentHTML('beforeend',
  '<p class="late" style="position:absolute;top:0">late</p>'), 300)</script></body></html>"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "page.html").write_text(PAGE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def shoot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@needs_chromium
def test_a_page_is_captured_at_the_viewport_size_after_its_selector_appears(site, tmp_path):
    out = tmp_path / "shots" / "page.png"
    result = shoot(
        "/page.html",
        str(out),
        "--base-url",
        site,
        "--width",
        "640",
        "--height",
        "480",
        "--wait-for",
        "p.late",
        "--settle",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (640, 480)


@needs_chromium
def test_full_page_captures_beyond_the_viewport(site, tmp_path):
    out = tmp_path / "full.png"
    result = shoot(
        f"{site}/page.html",
        str(out),
        "--width",
        "500",
        "--height",
        "300",
        "--full-page",
        "--settle",
        "0",
    )
    assert result.returncode == 0, result.stderr
    width, height = png_size(out)
    assert (width, height) == (500, 1500)


@needs_chromium
def test_a_selector_that_never_appears_times_out(site, tmp_path):
    out = tmp_path / "never.png"
    result = shoot(
        "/page.html", str(out), "--base-url", site, "--wait-for", "#never", "--timeout", "1"
    )
    assert result.returncode == 1
    assert "timed out after 1 s waiting for 1 x '#never'" in result.stderr
    assert not out.exists()


def test_an_unreachable_page_is_named(tmp_path):
    result = shoot("/runs", str(tmp_path / "x.png"), "--base-url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9/runs" in result.stderr


def test_a_missing_page_gives_its_status(site, tmp_path):
    result = shoot("/absent", str(tmp_path / "x.png"), "--base-url", site)
    assert result.returncode == 1
    assert "answered HTTP 404" in result.stderr


def test_without_chromium_the_debian_package_is_named(site, tmp_path):
    result = shoot(
        "/page.html", str(tmp_path / "x.png"), "--base-url", site, "--chromium", "/nonexistent"
    )
    assert result.returncode == 1
    assert "install the Debian package chromium" in result.stderr


@needs_chromium
def test_fit_graph_without_a_dagster_graph_says_so(site, tmp_path):
    out = tmp_path / "nograph.png"
    result = shoot("/page.html", str(out), "--base-url", site, "--fit-graph", "--settle", "0")
    assert result.returncode == 1
    assert "--fit-graph: no Dagster graph on the page" in result.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    """`dagster-webserver` of the project's workspace (no database needed to draw the lineage)."""
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {"DAGSTER_HOME": str(home), "IIOT_PARTITIONS_START": "2026-01-01"}
    port = free_port()
    log = home / "webserver.log"
    command = [Path(sys.executable).with_name("dagster-webserver"), "-h", "127.0.0.1"]
    command += ["-p", str(port), "-w", ROOT / "workspace.yaml"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            try:
                if [e["loadStatus"] for e in code_locations(url)] == ["LOADED"]:
                    break
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


FIT = re.compile(
    r"fit the graph: (\d+) nodes in (\d+) x (\d+) px of (\d+) x (\d+) px at (\d+)% "
    r"\(Dagster's own fit: (\d+)%\); nodes at \[(-?\d+), (-?\d+), (-?\d+), (-?\d+)\], "
    r"view \[(\d+), (\d+), (\d+), (\d+)\]"
)


@needs_chromium
def test_fit_graph_fills_the_window_with_every_asset_group(dagster_ui, tmp_path):
    """The README's picture: the navigation and the group sidebar hidden, every group's node
    inside the view, the graph as large as the view allows (before, Dagster's own fit of the
    narrower view left it beside the sidebar at two thirds of this size)."""
    from iiot_orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    groups = {graph.get(key).group_name for key in graph.get_all_asset_keys()}
    out = tmp_path / "graph.png"
    result = shoot(
        "/asset-groups",
        str(out),
        "--base-url",
        dagster_ui,
        "--wait-for",
        "foreignObject",
        "--min-count",
        str(len(groups)),
        "--fit-graph",
        "--settle",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (1600, 900)
    fit = FIT.search(result.stdout)
    assert fit, result.stdout
    nodes, width, height, room_w, room_h, zoom, dagster_zoom = map(int, fit.groups()[:7])
    left, top, right, bottom, v_left, v_top, v_right, v_bottom = map(int, fit.groups()[7:])
    assert nodes == len(groups)  # collapsed: one node per group
    assert v_left < 100  # no sidebar (270 px) beside the graph, the navigation collapsed
    assert (v_right, v_bottom) == (1600, 900)
    assert v_left < left < right < v_right  # every node inside the view
    assert v_top < top < bottom < v_bottom
    assert max(width / room_w, height / room_h) >= 0.97  # filled in one dimension at least
    assert zoom >= dagster_zoom
