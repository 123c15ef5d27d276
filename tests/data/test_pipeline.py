"""The data pipeline: masked-label checks, epochs, sharding across processes, resumable positions."""

import json

import pytest
import torch

from peftkit.data.formatters import Formatted, Segment, get_formatter
from peftkit.data.pipeline import DataPosition, TokenizedData, shard
from peftkit.data.sources import FileSource, MemorySource

RECORDS = [{"prompt": "x" * (1 + i % 9), "completion": "y" * (1 + i % 3)} for i in range(37)]


def pipeline(tokenizer, records=RECORDS, source=None, **kwargs):
    options = {"batch_size": 4, "bucket_window": 2, **kwargs}
    return TokenizedData(source or MemorySource(records), get_formatter("prompt_completion"), tokenizer, **options)


def rows(batch):
    """Each row's unpadded ids, as tuples (order-independent comparisons)."""
    ids, mask = batch.tensors["input_ids"], batch.tensors["attention_mask"]
    return [tuple(ids[r][mask[r].bool()].tolist()) for r in range(ids.shape[0])]


def test_every_label_masked_is_an_error(char_tokenizer):
    def prompt_only(record):
        return Formatted((Segment(record["prompt"]),))

    with pytest.raises(ValueError, match="every label is masked: none of the 37 records"):
        TokenizedData(MemorySource(RECORDS), prompt_only, char_tokenizer, batch_size=4)


def test_an_example_without_labels_is_dropped_and_counted(char_tokenizer):
    records = [*RECORDS[:5], {"prompt": "abc", "completion": ""}]
    data = pipeline(char_tokenizer, records)
    assert data.stats.examples == 5 and data.stats.dropped_unlabelled == 1


def test_drop_truncation_skips_long_examples(char_tokenizer):
    data = pipeline(char_tokenizer, truncation="drop", max_length=6)
    assert data.stats.dropped_too_long == sum(len(r["prompt"]) + len(r["completion"]) > 6 for r in RECORDS)
    assert all(len(e) <= 6 for e in data.examples)


def test_a_record_error_names_the_record(char_tokenizer):
    with pytest.raises(ValueError, match=r"data: record 2 of in-memory records: record has no field 'completion'"):
        pipeline(char_tokenizer, [*RECORDS[:2], {"prompt": "no completion"}])


def test_each_epoch_covers_every_example_once_in_a_new_order(char_tokenizer):
    data = pipeline(char_tokenizer)
    assert data.batches_per_epoch() == 10
    stream = data.batches()
    first = [next(stream) for _ in range(10)]
    second = [next(stream) for _ in range(10)]
    assert first[-1].epoch_end and not first[0].epoch_end
    expected = sorted(tuple(e.input_ids) for e in data.examples)
    assert sorted(r for b in first for r in rows(b)) == expected
    assert sorted(r for b in second for r in rows(b)) == expected
    assert [rows(b) for b in first] != [rows(b) for b in second]
    assert second[0].position.epoch == 1
    assert sum(b.num_label_tokens for b in first) == sum(len(r["completion"]) for r in RECORDS)


@pytest.mark.parametrize("streaming", [False, True])
def test_starting_from_a_saved_position_continues_exactly(char_tokenizer, tmp_path, streaming):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    make = lambda: pipeline(char_tokenizer, source=FileSource(path, streaming=streaming))  # noqa: E731
    stream = make().batches()
    uninterrupted = [next(stream) for _ in range(25)]
    resumed_stream = make().batches(DataPosition.from_dict(uninterrupted[12].position.to_dict()))
    resumed = [next(resumed_stream) for _ in range(12)]
    for a, b in zip(uninterrupted[13:], resumed, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert a.position == b.position and a.epoch_end == b.epoch_end


def test_streamed_epochs_cover_every_record(char_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    data = pipeline(char_tokenizer, source=FileSource(path, streaming=True))
    assert data.streaming and data.batches_per_epoch() is None
    stream = data.batches()
    epoch = []
    while not epoch or not epoch[-1].epoch_end:
        epoch.append(next(stream))
    assert sum(b.rows for b in epoch) == 37
    assert next(stream).position.epoch == 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_split_each_global_batch(char_tokenizer, world_size):
    """DistributedSampler semantics: the ranks' rows together are exactly the single-process batch."""
    single = pipeline(char_tokenizer, batch_size=8).batches()
    ranks = [pipeline(char_tokenizer, batch_size=8, rank=r, world_size=world_size).batches() for r in range(world_size)]
    for _ in range(12):  # crosses an epoch boundary (37 rows, batches of 8: a short last batch)
        whole = next(single)
        parts = [next(stream) for stream in ranks]
        assert [r for p in parts for r in rows(p)] == rows(whole)
        assert sum(p.num_label_tokens for p in parts) == whole.num_label_tokens
        assert len({p.position.to_dict().__repr__() for p in parts}) == 1


def test_shard_sizes():
    assert [shard(list(range(5)), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [shard([0], r, 2) for r in range(2)] == [[0], []]
