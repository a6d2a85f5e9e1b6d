"""Turning text (YAML or JSON, one or many documents) into model objects, with one clear
message per problem. Used by the CLI for files and by the store for values read from etcd."""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml
from pydantic import BaseModel, ValidationError

from .resources import API_VERSION, KINDS, STATUS_KINDS


# A value with thousands of bad items (say a 1 MB spec written by hand) must not become thousands
# of lines in a CLI warning or an agent's status: the first few say what is wrong.
MAX_PROBLEMS = 20


class ManifestError(ValueError):
    """A document that cannot become a model object; `problems` holds one line per problem."""

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        if len(problems) > MAX_PROBLEMS:
            problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problem(s)"]
        self.problems = problems
        super().__init__("\n".join(f"{where}: {p}" for p in problems))


@dataclass
class Document:
    where: str  # "FILE#N (Kind/name)" for messages
    data: object


def split_documents(text: str, source: str = "<input>") -> list[Document]:
    """Every document in a YAML stream (JSON is YAML too); empty documents are skipped.
    A top-level list, or a `kind: List` with `items`, counts as several documents."""
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(source, [f"not valid YAML or JSON: {_one_line(str(e))}"]) from None
    except RecursionError:
        raise ManifestError(source, [_TOO_DEEP]) from None
    docs: list[Document] = []
    for n, d in enumerate(raw, 1):
        items = d if isinstance(d, list) else d.get("items") if isinstance(d, dict) and d.get("kind") == "List" else None
        if isinstance(items, list):  # a string or mapping under `items` is one (bad) document
            for m, item in enumerate(items, 1):
                docs.append(Document(f"{source}#{n}.{m}", item))
        else:
            docs.append(Document(f"{source}#{n}" if len(raw) > 1 else source, d))
    return docs


def parse_object(data: object, where: str = "<input>", kinds: tuple[str, ...] | None = None) -> BaseModel:
    """Validate one decoded document as the model its `kind` names."""
    if not isinstance(data, dict):
        raise ManifestError(where, [f"expected a mapping with apiVersion, kind, metadata and spec, got {type(data).__name__}"])
    kind = data.get("kind")
    allowed = kinds or tuple(KINDS)
    if kind not in allowed:
        raise ManifestError(where, [f"kind {kind!r} is not one of {', '.join(allowed)}"])
    if data.get("apiVersion") != API_VERSION:
        raise ManifestError(where, [f"apiVersion must be {API_VERSION!r}, got {data.get('apiVersion')!r}"])
    name = data["metadata"].get("name") if isinstance(data.get("metadata"), dict) else None
    label = f"{where} ({kind}/{name})" if name else f"{where} ({kind})"
    try:
        return {**KINDS, **STATUS_KINDS}[kind].model_validate(data)
    except ValidationError as e:
        raise ManifestError(label, format_validation_error(e)) from None
    except RecursionError:
        raise ManifestError(label, [_TOO_DEEP]) from None


def parse_json_value(raw: bytes, where: str, kinds: tuple[str, ...] | None = None) -> BaseModel:
    """A value read from etcd: JSON (or YAML, for hand-written values) of one object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(where, ["value is not UTF-8 text"]) from None
    try:
        data = json.loads(text)
    except RecursionError:
        # Deeply nested garbage written by hand: one bad value, never a crash of every reader.
        raise ManifestError(where, [_TOO_DEEP]) from None
    except json.JSONDecodeError as e:
        # Something meant as JSON gets JSON's short message, not YAML's long one.
        if text.lstrip()[:1] in ("{", "["):
            raise ManifestError(where, [f"value is not valid JSON: {e}"]) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ManifestError(where, [f"value is neither JSON nor YAML: {_one_line(str(e))}"]) from None
        except RecursionError:
            raise ManifestError(where, [_TOO_DEEP]) from None
    return parse_object(data, where, kinds)


def format_validation_error(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # A model-level validator joins several problems with "; " -- give each its own line.
        for part in msg.split("; "):
            lines.append(f"{loc}: {part}" if loc else part)
    return lines


def to_json(obj: BaseModel) -> str:
    """Canonical JSON for etcd: no server-set fields such as metadata.generation."""
    data = obj.model_dump(mode="json", exclude_none=True)
    meta = data.get("metadata")
    if isinstance(meta, dict):
        meta.pop("generation", None)
        if not meta.get("labels"):
            meta.pop("labels", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


_TOO_DEEP = "nested too deeply to be a manifest"


def _one_line(s: str) -> str:
    return " ".join(s.split())
