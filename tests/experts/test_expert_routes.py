"""Mixed-expert inference: each row its own experts (unified LoRA, cluster prompt, persona prompt).

The oracle for a row is the row alone, unpadded, on the same base model and LoRA, with a *single*
soft prompt whose tensor is the concatenation of that row's cluster and persona rows (no bank, no
gather, no packing): composition means exactly ``[cluster][persona][tokens]``.
"""

import pytest
import torch

import peftkit
from peftkit.experts.bank import expert_row
from tests.conftest import tiny_model
from tests.experts.expert_cases import LENGTHS, ROWS, composed_model, left_padded, right_padded, soft_config


def alone(model, kind, route, ids, labels=None):
    """The row on its own: one single-prompt adapter holding cat(cluster row, persona row)."""
    parts = [
        model.adapters[name].table[expert_row(model.adapters[name], route[name])]
        for name in ("cluster", "persona")
        if route.get(name) is not None
    ]
    oracle_route = {"unified": 0} if "unified" in route else {}
    if parts:
        prompt = torch.cat(parts).detach()
        model.add_adapter("oracle", soft_config(kind, prompt.shape[0]))
        model.adapters["oracle"].load_adapter_state_dict({"prompt_embeddings": prompt}, trainable=False)
        oracle_route["oracle"] = 0
    try:
        out = model(input_ids=ids, labels=labels, experts=[oracle_route])
        return out if labels is not None else out.logits[0]
    finally:
        if parts:
            model.delete_adapter("oracle")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_mixed_batch_logits_equal_each_row_alone(arch, kind, padding):
    model = composed_model(arch, kind)
    ids, mask = (left_padded if padding == "left" else right_padded)(LENGTHS)
    logits = model(input_ids=ids, attention_mask=mask, experts=ROWS).logits
    assert logits.shape == (6, 6, 128)
    for row, route in enumerate(ROWS):
        real = mask[row].bool()
        expected = alone(model, kind, route, ids[row : row + 1, real])
        torch.testing.assert_close(logits[row, real], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_mixed_batch_greedy_tokens_equal_each_row_alone(kind):
    model = composed_model("qwen2", kind)
    ids, mask = left_padded(LENGTHS)
    out = model.generate(input_ids=ids, attention_mask=mask, experts=ROWS, max_new_tokens=6, eos_token_id=-1)
    for row, (route, length) in enumerate(zip(ROWS, LENGTHS, strict=True)):
        single = model.generate(
            input_ids=ids[row : row + 1, -length:], experts=[route], max_new_tokens=6, eos_token_id=-1
        )
        assert out[row, -6:].tolist() == single[0, -6:].tolist()


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_loss_of_a_mixed_batch_trains_each_rows_own_expert(kind):
    model = composed_model("llama", kind)
    ids, mask = left_padded(LENGTHS)
    # Labels as a completion-only pipeline writes them: none on padding, none on the first token (with
    # left padding a pad would "predict" it, as in Hugging Face models; alone nothing does).
    labels = torch.where(mask.bool(), ids, -100)
    for row, length in enumerate(LENGTHS):
        labels[row, -length] = -100
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, experts=ROWS).loss
    # the batch loss is the token-weighted mean of each row's loss alone
    total, count = 0.0, 0
    for row, (route, length) in enumerate(zip(ROWS, LENGTHS, strict=True)):
        row_labels = labels[row : row + 1, -length:]
        with torch.no_grad():
            row_loss = alone(model, kind, route, ids[row : row + 1, -length:], labels=row_labels).loss
        targets = length - 1
        total, count = total + row_loss * targets, count + targets
    torch.testing.assert_close(loss.detach(), total / count, atol=1e-5, rtol=1e-5)
    loss.backward()
    grad = model.adapters["persona"].embedding.weight.grad.view(10, 3, -1)
    used = {3, 7, 9}
    assert all(bool(grad[e].abs().sum() > 0) == (e in used) for e in range(10))


def test_a_merged_unified_lora_keeps_per_row_prompts():
    model = composed_model("llama", "prompt_tuning")
    rows = [r for r in ROWS if "unified" in r]
    ids, mask = left_padded([LENGTHS[i] for i, r in enumerate(ROWS) if "unified" in r])
    kept = model(input_ids=ids, attention_mask=mask, experts=rows).logits
    model.merge_adapter(["unified"])
    merged = model(input_ids=ids, attention_mask=mask, experts=rows).logits
    real = mask.bool()
    torch.testing.assert_close(merged[real], kept[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        model(input_ids=ids, attention_mask=mask, experts=[{}] * len(rows))


def test_many_experts_cost_what_one_costs():
    ids = [f"p{i:03d}" for i in range(200)]
    model = peftkit.get_peft_model(
        tiny_model("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=4, expert_ids=ids), "persona"
    )
    input_ids, mask = left_padded([5] * 200)
    every = model.prepare_inputs(input_ids, mask, routes=model.routes(200, None, "cpu", [{"persona": e} for e in ids]))
    one = model.prepare_inputs(input_ids, mask, routes=model.routes(200, None, "cpu", [{"persona": "p000"}] * 200))
    assert every.inputs_embeds.shape == one.inputs_embeds.shape == (200, 4 + 5, 32)


def test_a_batch_is_as_long_as_its_longest_row_needs():
    model = composed_model("llama", "prompt_tuning")
    ids, mask = left_padded([4, 4, 4])
    routes = model.routes(3, None, "cpu", [{"cluster": "c0"}, {"persona": "p001"}, {}])
    inputs = model.prepare_inputs(ids, mask, routes=routes)
    assert inputs.inputs_embeds.shape[1] == 3 + 4  # not 2 + 3 + 4
    routes = model.routes(3, None, "cpu", [{"cluster": "c0", "persona": "p001"}, {}, {}])
    assert model.prepare_inputs(ids, mask, routes=routes).inputs_embeds.shape[1] == 2 + 3 + 4


def test_route_errors_name_the_problem():
    model = composed_model("llama", "prompt_tuning")
    ids = torch.randint(3, 128, (1, 3))
    with pytest.raises(KeyError, match="'persona': no expert 'nobody'"):
        model(input_ids=ids, experts=[{"persona": "nobody"}])
    with pytest.raises(IndexError, match="out of range"):
        model(input_ids=ids, experts=[{"cluster": 3}])
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, experts=[{"style": 0}])
    with pytest.raises(KeyError, match="not a bank"):
        model(input_ids=ids, experts=[{"unified": "u1"}])
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        model(input_ids=ids, experts=[{}, {}])
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, experts=[{}], adapter_names=["unified"])


def test_adapter_names_still_route_rows():
    model = composed_model("llama", "prompt_tuning")
    ids = torch.randint(3, 128, (2, 4))
    by_name = model(input_ids=ids, adapter_names=["unified", "__base__"]).logits
    by_route = model(input_ids=ids, experts=[{"unified": "0"}, {}]).logits
    torch.testing.assert_close(by_name, by_route)
