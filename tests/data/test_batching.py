"""Segment tokenisation, padding and length bucketing."""

import pytest
import torch

from peftkit.data.batching import batches_forever, bucketed_order, collate, encode


def test_encode_masks_the_prompt(char_tokenizer):
    example = encode(char_tokenizer, "ab", "cd")
    assert example.input_ids == char_tokenizer("abcd")["input_ids"]
    assert example.labels == [-100, -100, *char_tokenizer("cd")["input_ids"]]


def test_encode_truncates_the_prompt_from_the_left(char_tokenizer):
    example = encode(char_tokenizer, "abcdef", "xy", max_length=4)
    assert example.input_ids == char_tokenizer("efxy")["input_ids"]
    with pytest.raises(ValueError, match="completion alone"):
        encode(char_tokenizer, "ab", "xyz", max_length=2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads(char_tokenizer, side):
    batch = collate(
        [encode(char_tokenizer, "a", "b"), encode(char_tokenizer, "abc", "d")], pad_token_id=0, padding_side=side
    )
    assert batch["input_ids"].shape == (2, 4)
    expected_mask = [[0, 0, 1, 1], [1, 1, 1, 1]] if side == "left" else [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == expected_mask
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["labels"][1].tolist() == [-100, -100, -100, char_tokenizer("d")["input_ids"][0]]


def test_bucketing_covers_everything_once_and_reduces_padding():
    lengths = [int(x) for x in torch.randint(1, 100, (500,), generator=torch.Generator().manual_seed(0))]
    batches = bucketed_order(lengths, batch_size=8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert bucketed_order(lengths, 8, seed=0) == batches

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in order)

    plain = [list(range(i, min(i + 8, 500))) for i in range(0, 500, 8)]
    assert padding(batches) < padding(plain) / 4


def test_batches_forever_reshuffles_each_epoch(char_tokenizer):
    examples = [encode(char_tokenizer, "x" * n, "y") for n in range(1, 9)]
    stream = batches_forever(examples, batch_size=4, pad_token_id=0, seed=0)
    first = [next(stream)["input_ids"].shape[1] for _ in range(2)]
    second = [next(stream)["input_ids"].shape[1] for _ in range(2)]
    assert sorted(first) == sorted(second) == [5, 9]
