"""ops/ui_screenshot.py against a static page served here: the PNG has the requested size, and
an unreachable page, a missing Chromium and a selector that never appears each say so."""

import shutil
import struct
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "ui_screenshot.py"
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
