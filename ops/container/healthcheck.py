#!/usr/bin/env python3
"""Container health check of the iiot image: exit 0 when URL answers 2xx within 5 s, else 1.

``iiot-healthcheck [URL]``; without URL, the tenant API's /health/live on IIOT_API_PORT (the
image's default command). compose.yaml names each service's own URL."""

from __future__ import annotations

import os
import sys
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("IIOT_API_PORT") or "8000"
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{port}/health/live"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http only
            return 0 if 200 <= response.status < 300 else 1
    except OSError as exc:  # refused, timed out, or an HTTPError (4xx, 5xx)
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
