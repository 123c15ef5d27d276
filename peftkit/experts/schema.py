"""The manifest's JSON Schema, exported to ``schemas/expert-manifest.schema.json``.

``python -m peftkit.experts.schema`` rewrites the file; ``tests/experts/test_schema.py`` fails when
the file and :class:`~peftkit.experts.manifest.ExpertManifest` disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from peftkit.experts.manifest import ExpertManifest

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "expert-manifest.schema.json"
SCHEMA_ID = "https://peftkit.dev/schemas/expert-manifest.schema.json"


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a manifest file."""
    schema = ExpertManifest.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    target = Path((argv or sys.argv[1:] or [str(SCHEMA_PATH)])[0])
    target.write_text(schema_text())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
