"""Write the tenant API's OpenAPI document to docs/api/openapi.json (or check it is current).

The committed file is the API's contract: tests/test_api_contract.py checks that a running `iiot
api` serves exactly it at /api/v1/openapi.json, so every change of a route, model or error shows
in review as a diff of this file (docs/api.md, "Versioning and deprecation").

    .venv/bin/python ops/api_openapi.py           # regenerate docs/api/openapi.json
    .venv/bin/python ops/api_openapi.py --check   # exit 1, naming the command, when it is stale
    .venv/bin/python ops/api_openapi.py -o -      # print it

The document comes from ``create_app(...).openapi()`` with the default settings; no database is
contacted (the application's pool opens only when a server starts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "api" / "openapi.json"
COMMAND = ".venv/bin/python ops/api_openapi.py"
# never connected to: the document does not depend on the database
_NO_DATABASE = "postgresql://openapi@127.0.0.1:1/openapi"


def openapi_document() -> dict[str, Any]:
    """The document `iiot api` serves at /api/v1/openapi.json."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from iiot_orchestration.api.app import create_app
    from iiot_orchestration.settings import load_settings

    return create_app(load_settings({}), _NO_DATABASE).openapi()


def render(document: dict[str, Any]) -> str:
    """The committed form: two-space indentation, the application's key order, UTF-8."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-o",
        "--output",
        default=str(DOCUMENT),
        help="Where to write it ('-' for standard output) [default: docs/api/openapi.json].",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="Write nothing; exit 1 when the file differs from the application's document.",
    )
    args = parser.parse_args(argv)
    text = render(openapi_document())
    if args.check:
        path = Path(args.output)
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            print(f"{path} is not the API's current OpenAPI document: run `{COMMAND}`")
            return 1
        print(f"{path} is current")
        return 0
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(document_paths(text))} paths)")
    return 0


def document_paths(text: str) -> list[str]:
    return list(json.loads(text).get("paths", {}))


if __name__ == "__main__":
    sys.exit(main())
