"""JSON Schemas for every kind, generated from the pydantic models into `crds/`.

    python -m controller.models.schema [--check] [DIR]

Output is deterministic (sorted keys, fixed indent, trailing newline) so that a test can
regenerate the files and compare them byte for byte with what is committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from .resources import (
    API_VERSION,
    Network,
    NetworkResourceFacts,
    NetworkResourceVerdicts,
    Node,
    NodeEvent,
    ResourceStatus,
    Workload,
    WorkloadStatus,
)

SCHEMA_KINDS: dict[str, type[BaseModel]] = {
    "Network": Network,
    "Workload": Workload,
    "Node": Node,
    "NetworkResourceStatus": ResourceStatus,
    "NetworkResourceFacts": NetworkResourceFacts,
    "NetworkResourceVerdicts": NetworkResourceVerdicts,
    "WorkloadStatus": WorkloadStatus,
    "Event": NodeEvent,
}

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "crds"


def schema_for(kind: str) -> dict:
    schema = SCHEMA_KINDS[kind].model_json_schema()
    # The models default apiVersion/kind for convenience in code, but a manifest must say them.
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://zmesh.io/schemas/v1/{kind.lower()}.schema.json"
    schema["title"] = f"{kind} ({API_VERSION})"
    return schema


def render(kind: str) -> str:
    return json.dumps(schema_for(kind), indent=2, sort_keys=True) + "\n"


def file_name(kind: str) -> str:
    return f"{kind.lower()}.schema.json"


def expected_files() -> dict[str, str]:
    return {file_name(k): render(k) for k in SCHEMA_KINDS}


def stale_files(directory: Path) -> list[str]:
    """Names of schema files in `directory` that are missing or differ from the models."""
    out = []
    for name, text in expected_files().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.models.schema",
                                 description="Write the JSON Schema of every kind into crds/.")
    ap.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files(args.directory)
        for name in stale:
            print(f"{args.directory / name} is out of date; run python -m controller.models.schema",
                  file=sys.stderr)
        return 1 if stale else 0
    args.directory.mkdir(parents=True, exist_ok=True)
    for name, text in expected_files().items():
        (args.directory / name).write_text(text)
        print(args.directory / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
