"""Screenshot of the Dagster UI's global asset lineage, for the README.

Drives headless Chromium over the DevTools protocol (``websockets`` comes with the Dagster
webserver): opens the page, dismisses the first-visit dialog, waits for the graph, saves a PNG.

    make dev                      # or: iiot dev, in another shell
    .venv/bin/python ops/ui_screenshot.py http://127.0.0.1:3000 docs/images/asset-graph.png

Needs a Chromium binary (Debian: apt-get install chromium), found as `chromium` or
`chromium-browser` on PATH or given with --chromium.
"""

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

DISMISS = """
(() => {
  const skip = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Skip');
  if (skip) { skip.click(); return 'dismissed'; }
  return 'none';
})()
"""
GRAPH_READY = (
    "document.querySelectorAll('[data-testid^=\"node-\"], .react-flow__node, svg g').length"
)


async def capture(ws_url: str, url: str, out: Path, width: int, height: int, wait_s: float):
    async with websockets.connect(ws_url, max_size=50_000_000) as ws:
        counter = 0

        async def call(method, **params):
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                message = json.loads(await ws.recv())
                if message.get("id") == counter:
                    return message.get("result", {})

        await call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await call("Page.enable")
        await call("Page.navigate", url=url)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            await call("Runtime.evaluate", expression=DISMISS)
            ready = await call("Runtime.evaluate", expression=GRAPH_READY, returnByValue=True)
            if ready.get("result", {}).get("value", 0) > 20:
                break
        await asyncio.sleep(3)  # let the layout settle after the dialog closed
        await call("Runtime.evaluate", expression=DISMISS)
        shot = await call("Page.captureScreenshot", format="png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="Dagster UI, e.g. http://127.0.0.1:3000")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
    )
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--wait", type=float, default=40.0, help="Seconds to wait for the graph")
    parser.add_argument("--port", type=int, default=9333, help="DevTools port")
    args = parser.parse_args()
    if not args.chromium:
        parser.error("no chromium on PATH: install it (Debian: chromium) or pass --chromium")
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                args.chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--remote-debugging-port={args.port}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(50):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json") as r:
                        pages = [p for p in json.load(r) if p.get("type") == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit("chromium's DevTools did not come up")
            url = args.base_url.rstrip("/") + "/asset-groups"
            asyncio.run(
                capture(
                    pages[0]["webSocketDebuggerUrl"],
                    url,
                    args.out,
                    args.width,
                    args.height,
                    args.wait,
                )
            )
        finally:
            browser.terminate()
            browser.wait(10)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
