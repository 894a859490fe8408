"""Problems from local files: JSON Lines (one object per line) or Parquet, through a field mapping.

    problems = load_problems("data/train.jsonl", get_task("math"), fields={"question": "problem",
                                                                         "answer": "solution"})

`fields` maps a task's canonical field name to the record's key; a canonical name left out of the mapping is
looked up under its own name. A key may be a dotted path into nested objects ("reward_model.ground_truth")
when the record has no key with the dots in it. Mapping `id` names the record's identifier; without it a
problem's id is "<file name>:<line>". Each problem is a plain dict of the canonical fields plus "id".

Every record is checked against the task's schema (`task.fields`, and `task.check_problem` if the task has
one); anything wrong — bad JSON, not an object, a missing mapped field, a value of the wrong type — is a
`DataError` naming the file and the 1-based line (row, for Parquet). Files ending in `.parquet` need
`pyarrow`, which fst_jax does not depend on; without it reading one raises an ImportError that says
`pip install pyarrow`. A `.json` file holding one JSON array of objects (as HoVer releases its data) is read
element by element, errors naming the element and its line. Anything else is read as JSON Lines (UTF-8;
blank lines are skipped but counted). A path may be a glob pattern; a list of paths is read in order.

A task may filter records with `keep(problem) -> bool` (e.g. HoVer-hard keeps claims of 3 or more hops);
records it drops are checked like the rest, and a file left with no problems is an error that says so.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fst_jax.tasks.base import Field, Task

PathLike = str | os.PathLike


class DataError(ValueError):
    """A problem file is missing or malformed; the message names the file and line."""


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Paths in order, glob patterns expanded (sorted). A path or pattern matching nothing is an error."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise DataError("no data files given")
    out: list[Path] = []
    for p in items:
        p = os.fspath(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise DataError(f"no data files match {p!r}")
            out.extend(Path(m) for m in matches)
        elif not os.path.isfile(p):
            raise DataError(f"data file not found: {p}")
        else:
            out.append(Path(p))
    return out


def read_records(path: PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of one file; `where` is "FILE, line N" or "FILE, row N" (1-based)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        yield from _read_parquet(path)
    elif path.suffix.lower() == ".json" and _starts_with(path, b"["):
        yield from _read_json_array(path)
    else:
        yield from _read_jsonl(path)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(prefix)


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    decoder, n, line, counted = json.JSONDecoder(), 0, 1, 0
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "]" and n == 0:
            return
        line += text.count("\n", counted, i)
        counted = i
        n += 1
        where = f"{path}, line {line} (element {n})"
        try:
            record, i = decoder.raw_decode(text, i)
        except ValueError as e:
            raise DataError(f"{where}: invalid JSON: {e}") from None
        except RecursionError:
            raise DataError(f"{where}: invalid JSON: nested too deeply") from None
        yield where, record
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            return
        raise DataError(f"{path}, line {line + text.count(chr(10), counted, i)}: expected ',' or ']' after "
                        f"element {n} of the JSON array")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}, line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                hint = ""
                if n == 1 and line.lstrip().startswith("["):
                    hint = " (this looks like a JSON array; write one JSON object per line: JSON Lines)"
                raise DataError(f"{where}: invalid JSON: {e}{hint}") from None
            except RecursionError:
                raise DataError(f"{where}: invalid JSON: nested too deeply") from None
            yield where, record


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading the Parquet file {path} needs pyarrow, which is not installed: "
                          "pip install pyarrow (or convert the file to JSON Lines)") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses on corrupt files
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    for n, record in enumerate(table.to_pylist(), 1):
        yield f"{path}, row {n}", record


_MISSING = object()


def _lookup(record: Mapping[str, Any], key: str) -> Any:
    if key in record:
        return record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _json_type(v: Any) -> str:
    return _type_names((type(v),))


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; only accept it where booleans are meant
        return bool in types
    return isinstance(value, types)


def check_mapping(fields: Mapping[str, str] | None, schema: Mapping[str, Field], task_name: str = "the task"):
    """Reject a mapping that names a field the task does not use (a typo would otherwise go unnoticed)."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(schema) - {"id"})
    if unknown:
        raise DataError(f"the field mapping names {', '.join(map(repr, unknown))}, which {task_name} does not use; "
                        f"its fields are: {', '.join([*schema, 'id'])}")
    for name, key in fields.items():
        if not isinstance(key, str) or not key:
            raise DataError(f"the field mapping for {name!r} must be a non-empty record key, got {key!r}")
    return fields


def to_problem(record: Any, where: str, schema: Mapping[str, Field], fields: Mapping[str, str],
               default_id: str) -> dict[str, Any]:
    """One record mapped to a problem dict and checked against `schema`; errors name `where`."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(record)}")
    problem: dict[str, Any] = {}
    for name, spec in schema.items():
        key = fields.get(name, name)
        value = _lookup(record, key)
        if value is _MISSING:
            if spec.required:
                mapped = f" (mapped to {name!r})" if key != name else ""
                keys = ", ".join(map(repr, list(record)[:20])) or "none"
                raise DataError(f"{where}: missing field {key!r}{mapped}; the record's keys are {keys}. "
                                f"Map it with fields={{{name!r}: '<key>'}}")
            continue
        if not _type_ok(value, spec.types):
            raise DataError(f"{where}: field {key!r} should be {_type_names(spec.types)}, "
                            f"got {_json_type(value)}")
        if spec.to_str and not isinstance(value, str):
            value = str(value)
        problem[name] = value
    if "id" in fields:
        rid = _lookup(record, fields["id"])
        if rid is _MISSING or not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise DataError(f"{where}: the id field {fields['id']!r} is missing or not a string/integer")
        problem["id"] = str(rid)
    else:
        problem["id"] = default_id
    return problem


def load_problems(paths: PathLike | Sequence[PathLike], task: Task,
                  fields: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """All problems of `paths` (in file order) mapped through `fields` and checked against `task`."""
    fields = check_mapping(fields, task.fields, f"task {task.name!r}")
    check = getattr(task, "check_problem", None)
    keep = getattr(task, "keep", None)
    problems: list[dict[str, Any]] = []
    seen_ids: dict[str, str] = {}
    for path in expand_paths(paths):
        before, dropped = len(problems), 0
        for where, record in read_records(path):
            problem = to_problem(record, where, task.fields, fields, f"{path.name}:{where.rsplit(' ', 1)[1]}")
            reason = check(problem) if check is not None else None
            if reason:
                keys = ", ".join(f"{n!r} from key {fields.get(n, n)!r}" for n in task.fields)
                raise DataError(f"{where}: {reason} (fields are read as: {keys})")
            if keep is not None and not keep(problem):
                dropped += 1
                continue
            if "id" in fields:
                if problem["id"] in seen_ids:
                    raise DataError(f"{where}: duplicate id {problem['id']!r} (first at {seen_ids[problem['id']]})")
                seen_ids[problem["id"]] = where
            problems.append(problem)
        if len(problems) == before:
            if dropped:
                raise DataError(f"{path}: task {task.name!r}'s filter dropped all {dropped} problems "
                                f"({getattr(task, 'filter_description', 'see its options')})")
            raise DataError(f"{path}: contains no problems")
    return problems
