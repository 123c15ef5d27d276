"""Where training records come from: JSONL, CSV, Parquet files, in-memory lists, a
``datasets.Dataset``, or a built-in dataset.

A source is re-iterable: every ``iter(source)`` starts again from the first record, in the same
order. Files are read lazily, record by record (Parquet: one record batch at a time), so a file
larger than memory can be streamed; ``skip(n)`` starts an iteration after ``n`` records without
formatting them (how a streamed run resumes). Compressed ``.gz`` / ``.bz2`` JSONL and CSV files are
read through the matching decompressor.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import inspect
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

FORMATS = ("jsonl", "csv", "parquet")

BuiltinLoader = Callable[..., list[dict[str, Any]]]
_BUILTINS: dict[str, BuiltinLoader] = {}


def register_dataset(name: str, loader: BuiltinLoader) -> None:
    """Register a built-in dataset: ``loader(split=..., **options)`` returns a list of records."""
    _BUILTINS[name] = loader


def known_datasets() -> list[str]:
    return sorted(_BUILTINS)


def _rotten_tomatoes(split: str = "train", test_size: int = 400, seed: int = 0) -> list[dict[str, Any]]:
    """``{"text", "label", "movie"}`` records; the demo's split (``test_size`` held out with ``seed``)."""
    from peftkit.data.rotten_tomatoes import load_records

    return load_records(split, test_size=test_size, seed=seed)


register_dataset("rotten_tomatoes", _rotten_tomatoes)


class RecordSource:
    """Records as mappings, re-iterable from the start.

    Attributes:
        name: where the records come from, for messages.
        streaming: records are read lazily from a file, never all held in memory.
    """

    name: str = "records"
    streaming: bool = False

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return self.skip(0)

    def skip(self, count: int) -> Iterator[Mapping[str, Any]]:
        """Iterate from record ``count`` on (``0``: from the start)."""
        raise NotImplementedError


class MemorySource(RecordSource):
    """A list of dicts, or anything indexable that yields mappings (e.g. a ``datasets.Dataset``)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], name: str = "in-memory records") -> None:
        self.records = records
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def skip(self, count: int) -> Iterator[Mapping[str, Any]]:
        return (self.records[i] for i in range(count, len(self.records)))


class FileSource(RecordSource):
    """A JSONL, CSV or Parquet file, read record by record."""

    def __init__(self, path: str | Path, format: str | None = None, streaming: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist")
        self.format = format or infer_format(self.path)
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not supported; use one of {', '.join(FORMATS)}")
        self.name = str(self.path)
        self.streaming = streaming

    def skip(self, count: int) -> Iterator[Mapping[str, Any]]:
        reader = {"jsonl": self._jsonl, "csv": self._csv, "parquet": self._parquet}[self.format]
        return itertools.islice(reader(), count, None)

    def _jsonl(self) -> Iterator[Mapping[str, Any]]:
        with _open_text(self.path) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{self.path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield record

    def _csv(self) -> Iterator[Mapping[str, Any]]:
        with _open_text(self.path) as text:
            yield from csv.DictReader(text)

    def _parquet(self) -> Iterator[Mapping[str, Any]]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as table:
            for batch in table.iter_batches(batch_size=1024):
                yield from batch.to_pylist()


def infer_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2")]
    suffix = suffixes[-1].lstrip(".") if suffixes else ""
    fmt = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl", "csv": "csv", "parquet": "parquet", "pq": "parquet"}
    if suffix not in fmt:
        raise ValueError(f"cannot tell the format of {path.name}; set format to one of {', '.join(FORMATS)}")
    return fmt[suffix]


def _open_text(path: Path) -> IO[str]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def check_dataset_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise if ``name`` is not a built-in dataset or its loader takes none of ``options``."""
    if name not in _BUILTINS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {', '.join(known_datasets())}")
    parameters = inspect.signature(_BUILTINS[name]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            raise ValueError(f"dataset {name!r} takes no option(s) {unknown}; it takes: {sorted(parameters)}")


def builtin_source(name: str, **options: Any) -> MemorySource:
    """A built-in dataset by name (``rotten_tomatoes``); options go to its loader (e.g. ``split``)."""
    check_dataset_options(name, options)
    return MemorySource(_BUILTINS[name](**options), name=f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})")


def as_source(data: RecordSource | Iterable[Mapping[str, Any]] | str | Path) -> RecordSource:
    """Wrap what a user passes: a source, a list of dicts, a ``datasets.Dataset``, or a file path."""
    if isinstance(data, RecordSource):
        return data
    if isinstance(data, str | Path):
        return FileSource(data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return MemorySource(data, name=type(data).__name__)  # type: ignore[arg-type]
    return MemorySource(list(data))


class LimitedSource(RecordSource):
    """The first ``limit`` records of another source."""

    def __init__(self, source: RecordSource, limit: int) -> None:
        self.source, self.limit = source, limit
        self.name = f"{source.name} (first {limit})"
        self.streaming = source.streaming

    def skip(self, count: int) -> Iterator[Mapping[str, Any]]:
        return itertools.islice(self.source.skip(count), max(0, self.limit - count))


def open_source(spec: Any) -> RecordSource:
    """The source a config's data section describes (:class:`peftkit.sections.SourceConfig`)."""
    if spec.builtin is not None:
        source: RecordSource = builtin_source(spec.builtin, **spec.options)
    elif spec.records is not None:
        source = MemorySource(spec.records, name="inline records")
    else:
        source = FileSource(spec.path, spec.format, streaming=spec.streaming)
    return LimitedSource(source, spec.limit) if spec.limit else source
