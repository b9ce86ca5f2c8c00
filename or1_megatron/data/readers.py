"""Read raw rows from parquet, JSON (a list) and JSON-lines files, optionally gzip-compressed.

Owns file formats only: it yields plain dicts with their row numbers and never interprets them.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from or1_megatron.data.records import DataError


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def file_kind(path: str | Path) -> str:
    """"parquet", "jsonl" or "json" from the file name (a trailing .gz is ignored)."""
    suffixes = [s for s in Path(path).suffixes if s != ".gz"]
    kind = suffixes[-1].lstrip(".") if suffixes else ""
    if kind not in ("parquet", "jsonl", "json"):
        raise DataError(str(path), None, "unknown data file type: expected .parquet, .json or .jsonl[.gz]")
    return kind


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """Yield (row number from 0, row dict). A row that is not a JSON object comes as a `DataError`
    for the caller to raise or count; a file that cannot be read at all raises one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "no such file")
    kind = file_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield index, row
        return
    with _open_text(path) as f:
        if kind == "json":
            try:
                rows = json.load(f)
            except ValueError as exc:
                raise DataError(str(path), None, f"invalid JSON: {exc}") from exc
            if not isinstance(rows, list):
                raise DataError(str(path), None, "a .json data file must hold a list of rows")
            for index, row in enumerate(rows):
                yield index, row if isinstance(row, dict) else DataError(
                    str(path), index, f"row is a {type(row).__name__}, not an object")
            return
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield index, DataError(str(path), index, f"invalid JSON line: {exc}")
                continue
            yield index, row if isinstance(row, dict) else DataError(
                str(path), index, f"row is a {type(row).__name__}, not an object")
