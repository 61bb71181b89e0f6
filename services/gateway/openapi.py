"""The gateway's OpenAPI document, kept in the repository as services/gateway/openapi.json.

    python -m services.gateway.openapi          # write it again after changing a route

A test checks that the file equals what the running gateway serves at /openapi.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.gateway.app import routes

PATH = Path(__file__).with_name("openapi.json")


def document() -> dict[str, Any]:
    return routes().openapi()


def text() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    PATH.write_text(text())
    print(f"wrote {PATH}")
