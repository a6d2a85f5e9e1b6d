"""Reading manifest files for `apply -f` and `delete -f`: every document of every file, every
problem one line naming the file and document (`m.yaml#2 Network/shop: spec.ipRnage: ...`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.admission import Item
from controller.models.manifest import Document, ManifestError, parse_object, parse_stream

SPEC_KINDS = ("Network", "Workload")


@dataclass
class Manifests:
    items: list[Item] = field(default_factory=list)  # the valid documents, in input order
    unreadable: list[str] = field(default_factory=list)  # files or text that are not YAML
    invalid: list[str] = field(default_factory=list)  # problems of documents, one line each
    # (kind, name) of documents that name an object but are invalid
    broken: set[tuple[str, str]] = field(default_factory=set)
    # (kind, name) of every document that names one, valid or not; and those that name none
    named: list[tuple[str, str]] = field(default_factory=list)
    unnamed: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return self.unreadable + self.invalid


def read_manifests(files: Sequence[str], stdin=None) -> Manifests:
    out = Manifests()
    for doc in _documents(files, stdin, out.unreadable):
        ref = kind_and_name(doc.data)
        if ref:
            out.named.append(ref)
        else:
            out.unnamed.append(doc.where)
        try:
            out.items.append(Item(parse_object(doc.data, doc.where, SPEC_KINDS), doc.where))
        except ManifestError as e:
            out.invalid += e.lines
            if ref:
                out.broken.add(ref)
    return out


def _documents(files: Sequence[str], stdin, problems: list[str]) -> list[Document]:
    docs: list[Document] = []
    for f in files:
        if f == "-":
            source, text = "<stdin>", (stdin or sys.stdin).read()
        else:
            source = f
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"{f}: cannot read: {getattr(e, 'strerror', None) or e}")
                continue
        found, broken = parse_stream(text, source)
        problems += broken
        if not found and not broken:
            problems.append(f"{source}: no documents")
        docs += found
    return docs


def kind_and_name(data: object) -> tuple[str, str] | None:
    """(kind, metadata.name) of a decoded document, even an invalid one."""
    if not isinstance(data, dict) or data.get("kind") not in SPEC_KINDS:
        return None
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return (data["kind"], name) if isinstance(name, str) and name else None
