"""Record sources: every format yields the same records; files are read lazily."""

import bz2
import csv
import gzip
import json

import pytest

from peftkit.data.sources import FileSource, LimitedSource, MemorySource, as_source, builtin_source

RECORDS = [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(25)]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet"}
    write_jsonl(paths["jsonl"], RECORDS)
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(RECORDS)
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"], row_group_size=7)
    paths["jsonl.gz"] = tmp_path / "d.jsonl.gz"
    write_jsonl(paths["jsonl.gz"], RECORDS, gzip.open)
    paths["csv.bz2"] = tmp_path / "d.csv.bz2"
    paths["csv.bz2"].write_bytes(bz2.compress(paths["csv"].read_bytes()))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "jsonl.gz", "csv.bz2"])
def test_every_format_yields_the_records(files, kind):
    source = FileSource(files[kind])
    assert list(source) == RECORDS
    assert list(source) == RECORDS  # re-iterable from the start
    assert list(source.skip(20)) == RECORDS[20:]


def test_in_memory_list_and_datasets_dataset():
    import datasets

    assert list(as_source(RECORDS)) == RECORDS
    dataset = datasets.Dataset.from_list(RECORDS)
    source = as_source(dataset)
    assert isinstance(source, MemorySource) and len(source) == 25
    assert list(source.skip(23)) == RECORDS[23:]


def test_files_stream_lazily(tmp_path):
    """A malformed line at the end is never reached when only the first records are read: the file
    is not loaded as a whole."""
    path = tmp_path / "big.jsonl"
    write_jsonl(path, RECORDS)
    with open(path, "a") as handle:
        handle.write("{this is not json\n")
    iterator = iter(FileSource(path))
    assert [next(iterator) for _ in range(3)] == RECORDS[:3]
    with pytest.raises(ValueError, match=r"big.jsonl:26: not valid JSON"):
        list(FileSource(path))


def test_limit_and_errors(tmp_path, files):
    assert list(LimitedSource(FileSource(files["jsonl"]), 4)) == RECORDS[:4]
    assert list(LimitedSource(FileSource(files["jsonl"]), 4).skip(3)) == RECORDS[3:4]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FileSource(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(ValueError, match="cannot tell the format of x.txt; set format to one of jsonl, csv, parquet"):
        FileSource(tmp_path / "x.txt")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        list(FileSource(tmp_path / "list.jsonl"))


def test_builtin_rotten_tomatoes_split():
    train = builtin_source("rotten_tomatoes", split="train")
    test = builtin_source("rotten_tomatoes", split="test")
    assert len(train) == 12808 - 400 and len(test) == 400
    assert set(next(iter(test))) == {"text", "label", "movie"}
    with pytest.raises(ValueError, match="unknown dataset 'imdb'; built-in datasets: rotten_tomatoes"):
        builtin_source("imdb")
