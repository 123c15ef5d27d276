"""Does greedy generate() equal the argmax of repeated full forwards (no cache)?

Runs the check for HF PEFT and for peftkit, for the three soft-prompt methods, on a tiny random
Llama, with unpadded single-row inputs (so no padding convention is involved). Each library is
compared with *its own* no-cache forward.

    .venv/bin/python scripts/check_peft_generate.py
"""

from __future__ import annotations

import warnings

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

STEPS = 8


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=None,
        bos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def reference(model, input_ids: torch.Tensor, virtual: int) -> torch.Tensor:
    """Argmax decoding by re-running the full sequence every step; ``virtual`` logits are skipped."""
    sequence = input_ids
    for _ in range(STEPS):
        logits = model(input_ids=sequence).logits[:, virtual:]
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


def main() -> None:
    warnings.filterwarnings("ignore")
    input_ids = torch.tensor([[5, 17, 33, 9, 64]])
    methods = {
        "prompt tuning": (peftkit.PromptTuningConfig, peft.PromptTuningConfig),
        "prefix tuning": (peftkit.PrefixTuningConfig, peft.PrefixTuningConfig),
        "p-tuning": (peftkit.PromptEncoderConfig, peft.PromptEncoderConfig),
    }
    print(f"{'method':<15}{'HF PEFT ' + peft.__version__:>18}{'peftkit':>12}")
    for name, (ours_cls, theirs_cls) in methods.items():
        torch.manual_seed(1)
        theirs = peft.get_peft_model(tiny_llama(), theirs_cls(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
        virtual = 0 if name == "prefix tuning" else 4
        with torch.no_grad():
            expected = reference(theirs, input_ids, virtual)
            generated = theirs.generate(input_ids=input_ids, max_new_tokens=STEPS, do_sample=False)
        peft_ok = torch.equal(generated, expected)

        torch.manual_seed(1)
        ours = peftkit.get_peft_model(tiny_llama(), ours_cls(num_virtual_tokens=4))
        with torch.no_grad():
            expected = reference(ours, input_ids, 0)
            generated = ours.generate(input_ids=input_ids, max_new_tokens=STEPS, do_sample=False)
        ours_ok = torch.equal(generated, expected)
        print(f"{name:<15}{'equal' if peft_ok else 'DIFFERENT':>18}{'equal' if ours_ok else 'DIFFERENT':>12}")


if __name__ == "__main__":
    main()
