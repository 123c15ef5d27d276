"""Virtual-token insertion (prompt tuning, p-tuning): placement, masks, labels, positions."""

import torch

from peftkit.methods.base import ModelInputs
from peftkit.methods.soft_prompt import insert_virtual_embeddings, leading_padding


def inputs(batch=2, length=10, dim=64, mask=None, labels=None):
    embeds = torch.randn(batch, length, dim)
    return ModelInputs.from_user(embeds, mask, labels)


def test_concatenates_prompt_with_inputs():
    prompt = torch.randn(5, 64)
    out = insert_virtual_embeddings(inputs(), prompt, torch.tensor([True, True]))
    assert out.inputs_embeds.shape == (2, 15, 64)
    torch.testing.assert_close(out.inputs_embeds[:, :5], prompt.expand(2, 5, 64))


def test_extends_the_attention_mask():
    mask = torch.ones(2, 10, dtype=torch.long)
    out = insert_virtual_embeddings(inputs(mask=mask), torch.randn(5, 64), torch.tensor([True, True]))
    assert out.attention_mask.shape == (2, 15)
    assert out.attention_mask[0, :5].sum() == 5


def test_creates_a_mask_when_absent():
    out = insert_virtual_embeddings(inputs(), torch.randn(5, 64), torch.tensor([True, True]))
    assert out.attention_mask.shape == (2, 15)
    assert out.attention_mask.sum() == 30


def test_pads_labels_with_ignore_index():
    labels = torch.arange(20).view(2, 10)
    out = insert_virtual_embeddings(inputs(labels=labels), torch.randn(3, 64), torch.tensor([True, True]))
    assert (out.labels[:, :3] == -100).all()
    assert torch.equal(out.labels[:, 3:], labels)


def test_virtual_tokens_go_after_left_padding():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    base = inputs(length=4, dim=2, mask=mask)
    prompt = torch.full((2, 2), 9.0)
    out = insert_virtual_embeddings(base, prompt, torch.tensor([True, True]))
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert (out.inputs_embeds[1, 2:4] == 9.0).all()  # after the two pads
    torch.testing.assert_close(out.inputs_embeds[1, :2], base.inputs_embeds[1, :2])
    torch.testing.assert_close(out.inputs_embeds[1, 4:], base.inputs_embeds[1, 2:])
    # the padded row's real tokens get the same positions as the unpadded row's last two tokens
    assert out.position_ids()[1, 4:].tolist() == [2, 3]
    assert out.user_positions.tolist() == [[2, 3, 4, 5], [0, 1, 4, 5]]


def test_unselected_rows_get_masked_slots_in_front():
    base = inputs(length=3, dim=2)
    out = insert_virtual_embeddings(base, torch.ones(2, 2), torch.tensor([True, False]))
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert out.position_ids()[1].tolist() == [0, 0, 0, 1, 2]  # as if the prompt were absent
    torch.testing.assert_close(out.inputs_embeds[1, 2:], base.inputs_embeds[1])


def test_user_positions_index_the_users_tokens():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    base = inputs(length=3, dim=4, mask=mask)
    out = insert_virtual_embeddings(base, torch.zeros(2, 4), torch.tensor([True, True]))
    gathered = torch.take_along_dim(out.inputs_embeds, out.user_positions.unsqueeze(-1), dim=1)
    torch.testing.assert_close(gathered, base.inputs_embeds)


def test_leading_padding_counts():
    mask = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 0, 1]])
    assert leading_padding(mask).tolist() == [2, 0, 3, 0]
