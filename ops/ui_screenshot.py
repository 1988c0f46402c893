"""Screenshot of any page of the Dagster UI (or any web page), for the README and the docs.

Drives headless Chromium over the DevTools protocol (``websockets`` comes with the Dagster
webserver): opens the page, dismisses Dagster's first-visit dialog, waits for the page to load
and, if asked, for a CSS selector, runs optional JavaScript, then saves a PNG.

    make dev                      # or: iiot dev, in another shell
    # the README's picture: every asset group, collapsed, the graph fit to the window
    .venv/bin/python ops/ui_screenshot.py /asset-groups docs/images/asset-graph.png \\
        --wait-for foreignObject --min-count 9 --fit-graph     # one foreignObject per group
    .venv/bin/python ops/ui_screenshot.py /runs /tmp/runs.png --wait-for table
    .venv/bin/python ops/ui_screenshot.py http://127.0.0.1:3001/assets /tmp/a.png --full-page

PAGE is a path on --base-url (default http://127.0.0.1:$IIOT_DAGSTER_PORT, port 3000) or a
whole URL. Needs a Chromium binary (Debian package: chromium), found as `chromium` or
`chromium-browser` on PATH or given with --chromium. Exits 1 with one line on stderr when the
page cannot be reached, Chromium is missing or fails, or the wait times out.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
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
# Dagster's lineage view: hide the navigation (the UI remembers it), so that after a reload the
# graph, whose groups start collapsed, is fit to a wider window.
FIT_GRAPH = """
(() => {
  const nav = [...document.querySelectorAll('button')]
    .find(b => b.textContent.trim() === 'Hide navigation');
  if (nav) nav.click();
  return Boolean(nav);
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


async def capture(ws_url: str, options: Options) -> None:
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
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
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


def screenshot(options: Options, chromium: str | None = None) -> None:
    check_reachable(options.url)
    binary = find_chromium(chromium)
    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as tmp:
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
            )
            try:
                ws_url = devtools_page(browser, profile, log, timeout=30)
                asyncio.run(capture(ws_url, options))
            except (OSError, websockets.WebSocketException) as exc:
                raise ScreenshotError(f"chromium's DevTools connection failed: {exc}") from None
            finally:
                browser.terminate()
                try:
                    browser.wait(10)
                except subprocess.TimeoutExpired:
                    browser.kill()
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
        help="Dagster lineage: hide the navigation and reload, so the graph fits a wider view",
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
        scripts=tuple(args.eval) + ((FIT_GRAPH,) if args.fit_graph else ()),
        reload=args.reload or args.fit_graph,
    )
    try:
        screenshot(options, args.chromium)
    except ScreenshotError as exc:
        print(f"ui_screenshot: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
