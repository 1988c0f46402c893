"""Screenshot of any page of the Dagster UI (or any web page), for the README and the docs.

Drives headless Chromium over the DevTools protocol (``websockets`` comes with the Dagster
webserver): opens the page, dismisses Dagster's first-visit dialog, waits for the page to load
and, if asked, for a CSS selector, runs optional JavaScript, fits a Dagster graph to the window
(--fit-graph: navigation and sidebar hidden, Dagster's zoom to fit, then zoomed and panned until
the nodes fill the view; it prints what it measured), then saves a PNG.

    make dev                      # or: iiot dev, in another shell
    # the README's picture: every asset group, collapsed, the graph fit to the window
    .venv/bin/python ops/ui_screenshot.py /asset-groups docs/images/asset-graph.png \\
        --wait-for foreignObject --min-count 10 --fit-graph    # one foreignObject per group
    .venv/bin/python ops/ui_screenshot.py /runs /tmp/runs.png --wait-for table
    .venv/bin/python ops/ui_screenshot.py http://127.0.0.1:3001/assets /tmp/a.png --full-page

PAGE is a path on --base-url (default http://127.0.0.1:$IIOT_DAGSTER_PORT, port 3000) or a
whole URL. Needs a Chromium binary (Debian package: chromium), found as `chromium` or
`chromium-browser` on PATH or given with --chromium. Exits 1 with one line on stderr when the
page cannot be reached, Chromium is missing or fails, the wait times out, or --fit-graph finds no
Dagster graph.
"""

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import websockets

DEBIAN_PACKAGE = "chromium"
DISMISS = """
(() => {
  const skip = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Skip');
  if (skip) { skip.click(); return 'dismissed'; }
  return 'none';
})()
"""
# Dagster's graphs (--fit-graph; Dagster 1.13's SVGViewport): hide the navigation and the group
# sidebar, let Dagster fit the graph to the wider view (a double click on the background is its
# zoom to fit, which stops at the layout's padded bounds and at 100 %; it fits only on load
# otherwise, not when the view widens), then zoom (ctrl + wheel, up to Dagster's maximum, 120 %)
# and pan (wheel) until the nodes fill the view inside `margin`, the zoom controls on the right
# kept clear. Every step waits until the graph stops moving (Dagster animates its zoom). Returns
# what it measured, or {"error": ...}.
FIT_GRAPH = """
(async () => {
  const margin = {left: 32, right: 80, top: 32, bottom: 32};
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const buttons = () => [...document.querySelectorAll('button')];
  const nav = buttons().find((b) => b.textContent.trim() === 'Hide navigation');
  if (nav) nav.click();
  const sidebar = buttons().find((b) => !b.textContent.trim()
    && b.querySelector('[aria-label="panel_show_right"]'));
  if (sidebar) sidebar.click();
  const viewport = document.querySelector('[data-svg-viewport]');
  const svg = viewport && viewport.querySelector('svg');
  if (!svg) return {error: 'no Dagster graph on the page'};
  const nodes = () => [...svg.querySelectorAll('foreignObject')]
    .map((n) => n.getBoundingClientRect()).filter((r) => r.width && r.height);
  const box = () => {
    const all = nodes();
    const left = Math.min(...all.map((r) => r.left)), top = Math.min(...all.map((r) => r.top));
    const right = Math.max(...all.map((r) => r.right));
    const bottom = Math.max(...all.map((r) => r.bottom));
    return {left, top, right, bottom, width: right - left, height: bottom - top};
  };
  const still = async () => {  // 0.5 s unmoved, group statuses loaded; 15 s at most
    let last = '', same = 0;
    for (let i = 0; i < 150 && same < 5; i++) {
      await sleep(100);
      const now = JSON.stringify([svg.getBoundingClientRect(), viewport.getBoundingClientRect()]);
      const loading = svg.textContent.includes('fetching statuses');
      same = now === last && !loading ? same + 1 : 0;
      last = now;
    }
  };
  const scale = () => svg.getBoundingClientRect().width / svg.width.baseVal.value;
  await still();
  if (!nodes().length) return {error: 'the Dagster graph has no nodes'};
  const view = viewport.getBoundingClientRect();
  viewport.dispatchEvent(new MouseEvent('dblclick',
    {bubbles: true, clientX: view.left + 4, clientY: view.top + 4}));
  await still();
  const fitted = scale();
  const room = {width: view.width - margin.left - margin.right,
                height: view.height - margin.top - margin.bottom};
  let b = box();
  for (let attempt = 0; attempt < 4; attempt++) {  // again if a late animation undid a step
    const zoom = Math.min(room.width / b.width, room.height / b.height);
    const before = scale();
    if (Math.abs(zoom - 1) > 0.005) {
      let deltaY = (1 - zoom) / 0.002;  // Dagster: scale * (1 - deltaY * 0.002), 0.01 to 30
      if (Math.abs(deltaY) <= 30) deltaY = (1 - zoom) / 0.01;
      viewport.dispatchEvent(new WheelEvent('wheel', {bubbles: true, cancelable: true,
        ctrlKey: true, deltaY, clientX: b.left + b.width / 2, clientY: b.top + b.height / 2}));
      await still();
      b = box();
    }
    const dx = view.left + margin.left + room.width / 2 - (b.left + b.width / 2);
    const dy = view.top + margin.top + room.height / 2 - (b.top + b.height / 2);
    if (Math.abs(dx) > 2 || Math.abs(dy) > 2) {
      viewport.dispatchEvent(new WheelEvent('wheel', {bubbles: true, cancelable: true,
        deltaX: -dx / 0.7, deltaY: -dy / 0.7, clientX: view.left + 4, clientY: view.top + 4}));
      await still();
      b = box();
    } else if (Math.abs(zoom - 1) <= 0.005 || scale() === before) {
      break;  // filled and centred, or at Dagster's maximum zoom and centred
    }
  }
  const round = (x) => Math.round(x);
  return {
    nodes: nodes().length, fitted, scale: scale(), sidebar: Boolean(sidebar),
    view: [view.left, view.top, view.right, view.bottom].map(round),
    room: [room.width, room.height].map(round),
    box: [b.left, b.top, b.right, b.bottom].map(round),
  };
})()
"""


class ScreenshotError(Exception):
    """A reason the screenshot could not be taken, said in one line."""


@dataclass
class Options:
    url: str
    out: Path
    width: int = 1600
    height: int = 900
    wait_for: str | None = None
    min_count: int = 1
    timeout: float = 40.0
    settle: float = 1.0
    full_page: bool = False
    scripts: tuple[str, ...] = ()
    reload: bool = False
    fit_graph: bool = False


def page_url(page: str, base_url: str) -> str:
    url = page if "://" in page else base_url.rstrip("/") + "/" + page.lstrip("/")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ScreenshotError(f"not an http(s) URL: {url}")
    return url


def check_reachable(url: str, timeout: float = 10.0) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (page_url: http(s))
            pass
    except urllib.error.HTTPError as exc:
        raise ScreenshotError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ScreenshotError(f"cannot reach {url}: {reason} (is the UI running?)") from None


def find_chromium(given: str | None) -> str:
    if given:
        found = shutil.which(given)
        if not found:
            raise ScreenshotError(
                f"no chromium at {given}: install the Debian package {DEBIAN_PACKAGE} "
                f"(apt-get install {DEBIAN_PACKAGE}) or pass --chromium PATH"
            )
        return found
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise ScreenshotError(
            f"no chromium on PATH: install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE}) or pass --chromium PATH"
        )
    return found


async def wait(evaluate, options: Options) -> None:
    """Until the page has loaded, or the selector matches enough elements; Dagster's dialog shut."""
    if options.wait_for:
        selector = json.dumps(options.wait_for)
        condition = f"document.querySelectorAll({selector}).length >= {options.min_count}"
        waiting_for = f"{options.min_count} x {options.wait_for!r}"
    else:
        condition = "document.readyState === 'complete'"
        waiting_for = "the page to load"
    deadline = time.monotonic() + options.timeout
    while not await evaluate(condition):
        if time.monotonic() > deadline:
            raise ScreenshotError(
                f"timed out after {options.timeout:g} s waiting for {waiting_for} on {options.url}"
            )
        await evaluate(DISMISS)
        await asyncio.sleep(0.25)
    await evaluate(DISMISS)


async def capture(ws_url: str, options: Options) -> dict | None:
    """Take the screenshot; with ``fit_graph``, what FIT_GRAPH measured."""
    async with websockets.connect(ws_url, max_size=200_000_000) as ws:
        counter = 0

        async def call(method: str, **params) -> dict:
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                message = json.loads(await ws.recv())
                if message.get("id") == counter:
                    if "error" in message:
                        raise ScreenshotError(f"chromium: {method}: {message['error']}")
                    return message.get("result", {})

        async def evaluate(expression: str):
            result = await call(
                "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
            )
            if "exceptionDetails" in result:
                details = result["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                raise ScreenshotError(f"JavaScript failed: {text}")
            return result.get("result", {}).get("value")

        await call(
            "Emulation.setDeviceMetricsOverride",
            width=options.width,
            height=options.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await call("Page.enable")
        navigated = await call("Page.navigate", url=options.url)
        if navigated.get("errorText"):
            raise ScreenshotError(f"cannot load {options.url}: {navigated['errorText']}")

        await wait(evaluate, options)
        for script in options.scripts:
            await evaluate(script)
            await asyncio.sleep(options.settle)
        if options.reload:
            await call("Page.reload")
            await asyncio.sleep(0.5)
            await wait(evaluate, options)
        fit = None
        if options.fit_graph:
            fit = await evaluate(FIT_GRAPH)
            if "error" in fit:
                raise ScreenshotError(f"--fit-graph: {fit['error']} ({options.url})")
        await asyncio.sleep(options.settle)  # animations and layout after the last change

        params = {"format": "png"}
        if options.full_page:
            metrics = await call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            width, height = max(options.width, int(size["width"])), int(size["height"])
            await call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            params |= {"captureBeyondViewport": True}
        shot = await call("Page.captureScreenshot", **params)
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_bytes(base64.b64decode(shot["data"]))
        return fit


def devtools_page(browser: subprocess.Popen, profile: Path, log: Path, timeout: float) -> str:
    """The WebSocket URL of the browser's first page, once its DevTools answer."""
    deadline = time.monotonic() + timeout
    active_port = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise ScreenshotError(
                f"chromium exited with code {browser.returncode}: "
                + (lines[-1] if lines else "no output")
            )
        if active_port.exists() and active_port.read_text().strip():
            port = active_port.read_text().split()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    pages = [p for p in json.load(r) if p.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
        time.sleep(0.1)
    raise ScreenshotError(f"chromium's DevTools did not come up within {timeout:g} s")


def screenshot(options: Options, chromium: str | None = None) -> dict | None:
    check_reachable(options.url)
    binary = find_chromium(chromium)
    # ignore_cleanup_errors: a Chromium helper killed a moment ago may still hold the profile
    with tempfile.TemporaryDirectory(prefix="ui-screenshot-", ignore_cleanup_errors=True) as tmp:
        profile, log = Path(tmp) / "profile", Path(tmp) / "chromium.log"
        with log.open("wb") as log_file:
            browser = subprocess.Popen(
                [
                    binary,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--no-first-run",
                    "--remote-debugging-port=0",  # Chromium picks a free port, written below
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,  # its helper processes too: stopped as one group
            )
            try:
                ws_url = devtools_page(browser, profile, log, timeout=30)
                return asyncio.run(capture(ws_url, options))
            except (OSError, websockets.WebSocketException) as exc:
                raise ScreenshotError(f"chromium's DevTools connection failed: {exc}") from None
            finally:
                stop(browser)


def stop(browser: subprocess.Popen) -> None:
    """Chromium and its helper processes (its session's group), so that none writes to the
    profile while the temporary directory is removed (that failed the run now and then)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(browser.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        browser.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(browser.pid, signal.SIGKILL)  # helpers that outlived the browser
    browser.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    port = os.environ.get("IIOT_DAGSTER_PORT", "3000")
    parser.add_argument("page", help="path on --base-url (/asset-groups, /runs, ...) or a URL")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--base-url", default=f"http://127.0.0.1:{port}", help="%(default)s")
    parser.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    parser.add_argument("--width", type=int, default=1600, help="viewport, %(default)s px")
    parser.add_argument("--height", type=int, default=900, help="viewport, %(default)s px")
    parser.add_argument("--wait-for", metavar="CSS", help="wait until this selector matches")
    parser.add_argument("--min-count", type=int, default=1, help="... this many elements")
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds, %(default)s")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before capture")
    parser.add_argument("--full-page", action="store_true", help="the whole page, not the view")
    parser.add_argument("--eval", action="append", default=[], metavar="JS", help="run first")
    parser.add_argument(
        "--reload", action="store_true", help="reload after --eval (state the page stores)"
    )
    parser.add_argument(
        "--fit-graph",
        action="store_true",
        help="Dagster's graph: hide the navigation and the sidebar, zoom and pan to fill the view",
    )
    args = parser.parse_args(argv)
    try:
        url = page_url(args.page, args.base_url)
    except ScreenshotError as exc:
        parser.error(str(exc))
    options = Options(
        url=url,
        out=args.out,
        width=args.width,
        height=args.height,
        wait_for=args.wait_for,
        min_count=args.min_count,
        timeout=args.timeout,
        settle=args.settle,
        full_page=args.full_page,
        scripts=tuple(args.eval),
        reload=args.reload,
        fit_graph=args.fit_graph,
    )
    try:
        fit = screenshot(options, args.chromium)
    except ScreenshotError as exc:
        print(f"ui_screenshot: {exc}", file=sys.stderr)
        return 1
    if fit:
        left, top, right, bottom = fit["box"]
        print(
            f"fit the graph: {fit['nodes']} nodes in {right - left} x {bottom - top} px of "
            f"{fit['room'][0]} x {fit['room'][1]} px at {fit['scale']:.0%} (Dagster's own fit: "
            f"{fit['fitted']:.0%}); nodes at {fit['box']}, view {fit['view']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
