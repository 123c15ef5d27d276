"""Routing belongs to the call: two threads using one model never see each other's adapters."""

import threading

import torch

from peftkit import LoraConfig, get_peft_model
from tests.conftest import tiny_model


def test_disable_adapter_in_one_thread_does_not_disable_another():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-4  # the adapter changes the output: the test can fail

    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def disabled_thread():
        with model.disable_adapter():
            inside.set()
            outside.wait(10)
            with torch.no_grad():
                seen["disabled"] = model(input_ids=ids).logits

    thread = threading.Thread(target=disabled_thread)
    thread.start()
    inside.wait(10)
    with torch.no_grad():
        seen["active"] = model(input_ids=ids).logits  # while the other thread is inside disable_adapter()
    outside.set()
    thread.join()
    torch.testing.assert_close(seen["active"], adapted)
    torch.testing.assert_close(seen["disabled"], base)
    assert not model._adapters_disabled
