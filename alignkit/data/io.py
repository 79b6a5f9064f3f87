"""Read rows from JSONL, JSON, Parquet, CSV files or a `datasets` hub name.

Every row comes back as a plain dict together with where it came from ("train.jsonl:17"), so a
later error about one row can name its file and line. Anything wrong with the file itself (not
there, not text, not valid JSON, cut short, empty) is a :class:`DataError` with a location.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import DataError

SUPPORTED = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


@dataclass
class LocatedRecords:
    """Rows of a data source plus, for each row, where it came from (for error messages)."""

    records: list[dict[str, Any]]
    locations: list[str]

    def __len__(self) -> int:
        return len(self.records)


def read_records(source: str, *, split: str = "train", limit: int | None = None) -> list[dict]:
    """Read every row (or the first `limit`) of a file or hub dataset as a list of dicts."""
    return read_located(source, split=split, limit=limit).records


def read_located(source: str, *, split: str = "train", limit: int | None = None) -> LocatedRecords:
    """Like :func:`read_records`, keeping each row's location ("file.jsonl:17")."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_hub_name(source):
            return _read_hub(source, split, limit)
        raise DataError(
            "data file does not exist",
            where=source,
            hint=f"check the path (relative paths start from {Path.cwd()}); "
            "a hub dataset is written org/name",
        )
    if path.is_dir():
        raise DataError(
            "is a directory, not a data file",
            where=source,
            hint=f"point at one file ({', '.join(SUPPORTED)})",
        )
    kind = _kind(path)
    if kind == "parquet":
        located = _read_parquet(path, limit)
    else:
        text = _read_text(path)
        if not text.strip():
            raise DataError("file is empty", where=str(path), hint="the file holds no rows")
        readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}
        located = readers[kind](text, str(path), limit)
    if not located.records:
        raise DataError("file holds no rows", where=str(path))
    return located


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    kinds = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
    if ext in kinds:
        return kinds[ext]
    if ext == ".csv":
        return "csv"
    raise DataError(
        f"unknown data file extension '{ext or '(none)'}'",
        where=str(path),
        hint=f"use one of {', '.join(SUPPORTED)} (optionally .gz), or a hub name org/name",
    )


def _looks_like_hub_name(source: str) -> bool:
    parts = source.split("/")
    if len(parts) != 2 or not all(parts) or source.startswith((".", "/", "~")):
        return False
    # A name with a data-file extension is a local path that is missing, not a hub dataset.
    return not any(source.lower().endswith(ext) for ext in (*SUPPORTED, ".gz"))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"not a valid gzip file ({exc})", where=str(path)) from None
    # NUL bytes never occur in UTF-8 text; they mean a binary file (or UTF-16, also unsupported).
    if b"\x00" in raw[:8192]:
        raise DataError(
            "looks like a binary file, not UTF-8 text",
            where=str(path),
            hint="save the data as UTF-8 JSONL/JSON/CSV, or use .parquet for binary tables",
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"not UTF-8 text (byte {exc.start}: {exc.reason})",
            where=f"{path}:{line}",
            hint="re-encode the file as UTF-8",
        ) from None


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg}: column {exc.colno}"


def _read_jsonl(text: str, where: str, limit: int | None) -> LocatedRecords:
    records, locations = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"not valid JSON ({_json_error(exc)})",
                where=f"{where}:{lineno}",
                hint="each line of a .jsonl file must be one complete JSON object",
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"expected a JSON object, got {type(row).__name__}",
                where=f"{where}:{lineno}",
                hint='each line must look like {"field": ...}',
            )
        records.append(row)
        locations.append(f"{where}:{lineno}")
        if limit is not None and len(records) >= limit:
            break
    return LocatedRecords(records, locations)


def _read_json(text: str, where: str, limit: int | None) -> LocatedRecords:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Several top-level values: the file is JSON Lines with a .json name.
            return _read_jsonl(text, where, limit)
        # An unterminated string always runs to the end (JSON strings cannot hold newlines).
        if not text[exc.pos :].strip() or exc.msg.startswith("Unterminated string"):
            raise DataError(
                f"JSON is cut short (ends at line {exc.lineno} while {exc.msg.lower()})",
                where=where,
                hint="the file looks truncated: was the download or write interrupted?",
            ) from None
        raise DataError(
            f"not valid JSON ({_json_error(exc)})", where=f"{where}:{exc.lineno}"
        ) from None
    rows = _json_rows(data, where)
    if limit is not None:
        rows = rows[:limit]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"item {i} is a {type(row).__name__}, expected a JSON object", where=where
            )
    return LocatedRecords(rows, [f"{where}[{i}]" for i in range(len(rows))])


def _json_rows(data: Any, where: str) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if lists in (["messages"], ["conversations"]):
            return [data]  # one conversation, not a list of rows
        if len(lists) == 1:
            return data[lists[0]]
        if not lists and data:
            return [data]
        found = ", ".join(lists) or "none"
        raise DataError(
            f"a JSON object must hold exactly one list of rows (lists found: {found})",
            where=where,
            hint='use a list of objects, {"data": [...]}, or JSON Lines',
        )
    raise DataError(f"expected a list of objects, got {type(data).__name__}", where=where)


def _read_csv(text: str, where: str, limit: int | None) -> LocatedRecords:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records, locations = [], []
    try:
        for row in reader:
            if None in row:  # DictReader's bucket for fields beyond the header
                raise DataError(
                    f"{len(reader.fieldnames or []) + len(row[None])} fields but the header "
                    f"has {len(reader.fieldnames or [])}",
                    where=f"{where}:{reader.line_num}",
                    hint="quote fields that contain commas",
                )
            records.append(dict(row))
            locations.append(f"{where}:{reader.line_num}")
            if limit is not None and len(records) >= limit:
                break
    except csv.Error as exc:
        raise DataError(f"not valid CSV ({exc})", where=f"{where}:{reader.line_num}") from None
    return LocatedRecords(records, locations)


def _read_parquet(path: Path, limit: int | None) -> LocatedRecords:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a valid Parquet file ({exc})", where=str(path)) from None
    if limit is not None:
        table = table.slice(0, limit)
    rows = table.to_pylist()
    return LocatedRecords(rows, [f"{path}:row {i + 1}" for i in range(len(rows))])


def _read_hub(source: str, split: str, limit: int | None) -> LocatedRecords:
    """A hub dataset, written `org/name` or `org/name:config` for one that has configs."""
    import datasets

    name, _, config = source.partition(":")
    sliced = f"{split}[:{limit}]" if limit is not None else split
    try:
        ds = datasets.load_dataset(name, config or None, split=sliced)
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"could not load hub dataset '{name}' ({str(exc).splitlines()[0]})",
            where=name,
            hint="without network access, download it elsewhere and point data.train at a file",
        ) from None
    except (ValueError, KeyError) as exc:
        raise DataError(
            f"could not load split '{split}' of hub dataset '{name}' ({exc})",
            where=name,
            hint="check data.split; a dataset with several configs is written "
            "org/name:config (for example openai/gsm8k:main)",
        ) from None
    rows = [dict(r) for r in ds]
    return LocatedRecords(rows, [f"{source}[{split}]:row {i + 1}" for i in range(len(rows))])
