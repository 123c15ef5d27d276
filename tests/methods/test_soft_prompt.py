"""Virtual-token insertion (prompt tuning, p-tuning): placement, masks, labels, positions."""

import torch

from peftkit.methods.base import ModelInputs
from peftkit.methods.soft_prompt import insert_virtual_embeddings, leading_padding, pack_virtual_slots


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


def test_per_row_prompts_are_inserted_row_by_row():
    prompts = torch.randn(2, 3, 4)
    out = insert_virtual_embeddings(inputs(length=2, dim=4), prompts, torch.tensor([True, True]))
    torch.testing.assert_close(out.inputs_embeds[:, :3], prompts)


def test_a_second_prompt_goes_after_the_first_and_before_the_tokens():
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    base = inputs(length=3, dim=2, mask=mask)
    cluster, persona = torch.full((2, 2), 1.0), torch.full((1, 2), 2.0)
    out = insert_virtual_embeddings(base, cluster, torch.tensor([True, True]))
    out = insert_virtual_embeddings(out, persona, torch.tensor([True, True]))
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert out.inputs_embeds[0, :3, 0].tolist() == [1.0, 1.0, 2.0]
    assert out.inputs_embeds[1, 1:4, 0].tolist() == [1.0, 1.0, 2.0]  # after the pad
    assert out.user_positions.tolist() == [[3, 4, 5], [0, 4, 5]]


def test_packing_drops_slots_no_row_uses():
    # row 0 uses a 3-token prompt, row 1 a 2-token one, row 2 none: 5 virtual columns before packing
    base = inputs(batch=3, length=4, dim=2, mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]]))
    out = insert_virtual_embeddings(base, torch.ones(3, 2), torch.tensor([True, False, False]))
    out = insert_virtual_embeddings(out, torch.full((2, 2), 2.0), torch.tensor([False, True, False]))
    assert out.inputs_embeds.shape[1] == 9
    packed = pack_virtual_slots(out)
    assert packed.inputs_embeds.shape[1] == 3 + 4  # max over rows of own virtual + L
    assert packed.attention_mask.tolist() == [[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0]]
    gathered = torch.take_along_dim(packed.inputs_embeds, packed.user_positions.unsqueeze(-1), dim=1)
    torch.testing.assert_close(gathered, base.inputs_embeds)
    # each row's real tokens keep the positions they have alone
    user_pos = packed.position_ids().gather(1, packed.user_positions)
    assert user_pos[0].tolist() == [3, 4, 5, 6] and user_pos[1, 1:].tolist() == [2, 3, 4]
    assert user_pos[2, :3].tolist() == [0, 1, 2]


def test_packing_moves_labels_with_their_tokens():
    labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
    base = inputs(batch=2, length=3, dim=2, mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), labels=labels)
    out = insert_virtual_embeddings(base, torch.ones(1, 2), torch.tensor([False, True]))
    out = pack_virtual_slots(insert_virtual_embeddings(out, torch.ones(3, 2), torch.tensor([True, False])))
    # row 0: 3 virtual + 3 tokens; row 1: 2 unused slots in front, 1 virtual, its tokens (right pad kept)
    assert out.labels.tolist() == [[-100, -100, -100, 5, 6, 7], [-100, -100, -100, 8, 9, -100]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]


def test_packing_the_key_value_prefix():
    keys = torch.arange(2 * 1 * 4 * 1, dtype=torch.float).view(2, 1, 4, 1)
    base = inputs(batch=2, length=2, dim=2)
    out = base.with_(prefix=[(keys, keys + 100)], prefix_mask=torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]]))
    packed = pack_virtual_slots(out)
    assert packed.prefix_mask.tolist() == [[1, 1], [1, 1]]
    assert packed.prefix[0][0][:, 0, :, 0].tolist() == [[0.0, 1.0], [5.0, 7.0]]
    assert packed.prefix[0][1][1, 0, :, 0].tolist() == [105.0, 107.0]
    unused = base.with_(prefix=[(keys, keys)], prefix_mask=torch.zeros(2, 4, dtype=torch.long))
    assert pack_virtual_slots(unused).prefix is None
