"""Turning text (YAML or JSON, one or many documents) into model objects, with one clear
message per problem. Used by the CLI for files and by the store for values read from etcd.

Messages speak Zero-Mesh, not pydantic: `m.yaml#2 Network/shop: spec.ipRnage: unknown field
(did you mean ipRange?)`. One path style everywhere (`spec.resources[1].subnet`); text that is
not YAML names the file, line and column."""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from dataclasses import dataclass

import yaml
from pydantic import BaseModel, ValidationError

from .resources import API_VERSION, KINDS, STATUS_KINDS, FieldProblems


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

    @property
    def lines(self) -> list[str]:
        return [f"{self.where}: {p}" for p in self.problems]


@dataclass
class Document:
    where: str  # "FILE#N" (or "FILE" for a file of one document), for messages
    data: object


def parse_stream(text: str, source: str = "<input>") -> tuple[list[Document], list[str]]:
    """Every document in a YAML stream (JSON is YAML too), and one line per piece of text that
    is not YAML (`FILE:LINE:COLUMN: ...`). Empty documents are skipped. A top-level list, or a
    `kind: List` with `items`, counts as several documents. A broken document does not hide the
    others: they are still returned (so that all their problems are reported in one round)."""
    problems: list[str] = []
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except RecursionError:
        return [], [f"{source}: {_TOO_DEEP}"]
    except yaml.YAMLError:
        raw = []
        for first_line, chunk in _chunks(text):
            try:
                raw += [d for d in yaml.safe_load_all(chunk) if d is not None]
            except yaml.YAMLError as e:
                raw.append(_BROKEN)
                problems.append(_yaml_problem(e, source, first_line))
            except RecursionError:
                raw.append(_BROKEN)
                problems.append(f"{source}: {_TOO_DEEP}")
    docs: list[Document] = []
    for n, d in enumerate(raw, 1):
        if d is _BROKEN:
            continue
        items = d if isinstance(d, list) else d.get("items") if isinstance(d, dict) and d.get("kind") == "List" else None
        if isinstance(items, list):  # a string or mapping under `items` is one (bad) document
            for m, item in enumerate(items, 1):
                docs.append(Document(f"{source}#{n}.{m}", item))
        else:
            docs.append(Document(f"{source}#{n}" if len(raw) > 1 else source, d))
    return docs, problems


def split_documents(text: str, source: str = "<input>") -> list[Document]:
    """The documents of a stream (see parse_stream); text that is not YAML raises ManifestError."""
    docs, problems = parse_stream(text, source)
    if problems:
        where, _, problem = problems[0].partition(": ")
        raise ManifestError(where, [problem])
    return docs


_BROKEN = object()
_DOC_START = re.compile(r"^---(?=[ \t\r]|$)", re.MULTILINE)


def _chunks(text: str):
    """(first line number, text) of each document of a stream, split at `---` lines."""
    starts = [0] + [m.start() for m in _DOC_START.finditer(text) if m.start() > 0]
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        yield text.count("\n", 0, begin), text[begin:end]


def _yaml_problem(e: yaml.YAMLError, source: str, first_line: int) -> str:
    mark, what = _yaml_error(e)
    where = source if mark is None else f"{source}:{first_line + mark.line + 1}:{mark.column + 1}"
    return f"{where}: not valid YAML or JSON: {what}"


def _yaml_error(e: yaml.YAMLError):
    """(the position, or None, and the problem in one line) of a YAML error: its problem and
    context only, never PyYAML's multi-line excerpt with a caret."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    if problem is None:
        return mark, _one_line(str(e))
    return mark, problem + (f" ({context})" if context else "")


def parse_object(data: object, where: str = "<input>", kinds: tuple[str, ...] | None = None) -> BaseModel:
    """Validate one decoded document as the model its `kind` names. A manifest's `status` and
    `metadata.generation` are the server's, never the user's: they are ignored, so what
    `zmesh get/describe -o yaml` prints can be applied again."""
    if not isinstance(data, dict):
        raise ManifestError(where, [f"expected a mapping with apiVersion, kind, metadata and spec, got {_type_name(data)}"])
    kind = data.get("kind")
    allowed = kinds or tuple(KINDS)
    problems = []
    if kind not in allowed:
        problems.append(_kind_problem(kind, allowed))
    if data.get("apiVersion") is None:
        problems.append(f"apiVersion: required field is missing (must be {API_VERSION!r})")
    elif data.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION!r}, got {data.get('apiVersion')!r}")
    if problems:
        raise ManifestError(where, problems)
    model = {**KINDS, **STATUS_KINDS}[kind]
    if kind in KINDS:
        data = _without_server_fields(data)
    name = data["metadata"].get("name") if isinstance(data.get("metadata"), dict) else None
    label = f"{where} {kind}/{name}" if isinstance(name, str) and name else f"{where} {kind}"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ManifestError(label, format_validation_error(e, model)) from None
    except RecursionError:
        raise ManifestError(label, [_TOO_DEEP]) from None


def _without_server_fields(data: dict) -> dict:
    data = {k: v for k, v in data.items() if k != "status"}
    meta = data.get("metadata")
    if isinstance(meta, dict) and "generation" in meta:
        data["metadata"] = {k: v for k, v in meta.items() if k != "generation"}
    return data


def _kind_problem(kind: object, allowed: tuple[str, ...]) -> str:
    if kind is None:
        return f"kind: required field is missing (one of {', '.join(allowed)})"
    text = f"kind: {kind!r} is not one of {', '.join(allowed)}"
    if isinstance(kind, str):
        close = difflib.get_close_matches(kind, allowed, n=1, cutoff=0.6) or [
            k for k in allowed if k.lower() == kind.lower().rstrip("s")]
        if close:
            text += f" (did you mean {close[0]}?)"
    return text


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
            mark, what = _yaml_error(e)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ManifestError(where, [f"value is neither JSON nor YAML{at}: {what}"]) from None
        except RecursionError:
            raise ManifestError(where, [_TOO_DEEP]) from None
    return parse_object(data, where, kinds)


# --- validation errors in Zero-Mesh's words -------------------------------------------------


def field_path(loc: tuple) -> str:
    """("spec", "resources", 1, "subnet") -> "spec.resources[1].subnet"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES = {  # pydantic's error types, said plainly
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "missing": "required field is missing",
}


def format_validation_error(e: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: `path: message`. An unknown field that is a typo of a missing one
    is one problem ("did you mean"), not two."""
    errors = e.errors()
    missing = {tuple(err["loc"]) for err in errors if err["type"] == "missing"}
    explained: set[tuple] = set()  # missing fields that an unknown field's "did you mean" covers
    for err in errors:
        if err["type"] == "extra_forbidden":
            loc = tuple(err["loc"])
            guess = _did_you_mean(str(loc[-1]), loc[:-1], missing - explained, model)
            if guess and loc[:-1] + (guess,) in missing:
                explained.add(loc[:-1] + (guess,))
            err["msg"] = "unknown field" + (f" (did you mean {guess}?)" if guess else "")
    lines = []
    for err in errors:
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == "missing" and loc in explained:
            continue
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, FieldProblems):
            # A model-level rule names the fields it judged: report each at its full path.
            base = field_path(loc)
            lines += [f"{base}.{sub}: {message}" if base and sub else f"{base or sub}: {message}"
                      for sub, message in error.problems]
            continue
        msg = _MESSAGES.get(kind) or err["msg"]
        if kind == "literal_error":
            msg = f"must be {err['ctx']['expected']}"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{field_path(loc)}: {msg}" if loc else msg)
    return lines


def _did_you_mean(field: str, parent: tuple, missing: set[tuple], model) -> str | None:
    absent = [str(m[-1]) for m in missing if m[:-1] == parent]
    guess = (difflib.get_close_matches(field, absent, n=1, cutoff=0.6)
             or difflib.get_close_matches(field, _fields_at(model, parent), n=1, cutoff=0.6))
    return guess[0] if guess else None


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the model found at `loc` inside `model` (empty when unknown)."""
    current = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue  # a list item: `current` is already the item's model
        field = current.model_fields.get(part) if isinstance(current, type) else None
        current = _model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation) -> type[BaseModel] | None:
    """The BaseModel class in an annotation such as `Spec`, `list[Spec]` or `Spec | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _type_name(value: object) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "true/false", list: "a list",
            type(None): "nothing"}.get(type(value), type(value).__name__)


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
