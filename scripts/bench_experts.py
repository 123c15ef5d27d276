"""Expert banks on SmolLM2-135M-Instruct (or a tiny random Llama): what many experts cost.

Measures, in one process:

* a forward pass (no grad) over ``--rows`` rows where every row uses its *own* persona expert (a
  bank of ``--experts``) plus a cluster prompt and the frozen unified LoRA, against the same batch
  where every row uses one expert, and against one forward per row (the loop a single-adapter
  library needs). Reported: median seconds of ``--repeats`` runs, each side alternating;
* loading a bank of ``--experts`` experts from its folder, and building it from as many single
  PEFT-format folders;
* the memory of a 10,000-expert bank: its table bytes and the growth of the process's RSS.

    python scripts/bench_experts.py                      # SmolLM2 (embedded), writes runs/bench_experts.json
    python scripts/bench_experts.py --model tiny         # a random 4-layer Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.bench.common import rss_bytes
from peftkit.experts.bank_files import bank_from_folders, export_expert


def base_model(name: str) -> torch.nn.Module:
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(config).eval()
    from peftkit.models.loading import load_base

    return load_base(name)[0].eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder, or 'tiny'")
    parser.add_argument("--experts", type=int, default=200)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--virtual", type=int, default=8, help="persona prompt length (the cluster's is half)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_experts.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results: dict[str, object] = {"model": args.model, **{k: v for k, v in vars(args).items() if k != "out"}}

    model = get_peft_model(base_model(args.model), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), "unified")
    model.adapters["unified"].freeze()
    personas = [f"p{i:03d}" for i in range(args.experts)]
    model.add_adapter("cluster", PromptTuningConfig(num_virtual_tokens=args.virtual // 2, expert_ids=["c0", "c1"]))
    model.add_adapter("persona", PromptTuningConfig(num_virtual_tokens=args.virtual, expert_ids=personas))
    vocab = model.base_model.config.vocab_size
    input_ids = torch.randint(3, vocab, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    own = [{"unified": 0, "cluster": i % 2, "persona": personas[i % args.experts]} for i in range(args.rows)]
    same = [{"unified": 0, "cluster": 0, "persona": personas[0]}] * args.rows

    with torch.no_grad():
        model(input_ids=input_ids[:2], experts=own[:2])  # warm up
        mixed = timed(lambda: model(input_ids=input_ids, experts=own), args.repeats)
        single = timed(lambda: model(input_ids=input_ids, experts=same), args.repeats)
        per_row = timed(
            lambda: [model(input_ids=input_ids[i : i + 1], experts=own[i : i + 1]) for i in range(args.rows)], 1
        )
    length = model.prepare_inputs(input_ids, routes=model.routes(args.rows, None, "cpu", own)).inputs_embeds.shape[1]
    results["forward_s"] = {
        "distinct_experts": min(args.rows, args.experts),
        "mixed_batch": round(mixed, 4),
        "one_expert_batch": round(single, 4),
        "one_forward_per_row": round(per_row, 4),
        "sequence_length": length,
    }
    print(
        f"forward, {args.rows} rows: {min(args.rows, args.experts)} experts {mixed:.3f}s, 1 expert {single:.3f}s, "
        f"one forward per row {per_row:.3f}s; sequence length {length} (= {args.virtual // 2} + {args.virtual} + "
        f"{args.tokens})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["persona"])
        for expert in personas:
            export_expert(model, "persona", expert, Path(tmp) / "single" / expert)
        fresh = PeftModel(model.base_model, None)
        start = time.perf_counter()
        fresh.load_adapter(Path(tmp) / "persona", "persona")
        load_bank = time.perf_counter() - start
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bank_from_folders(fresh, "built", [Path(tmp) / "single" / e for e in personas])
        load_folders = time.perf_counter() - start
    results["load_s"] = {"bank_folder": round(load_bank, 4), "single_folders": round(load_folders, 4)}
    print(f"load {args.experts} experts: bank folder {load_bank:.3f}s, {args.experts} PEFT folders {load_folders:.3f}s")

    before = rss_bytes()
    many = [f"u{i:05d}" for i in range(10_000)]
    model.add_adapter("users", PromptTuningConfig(num_virtual_tokens=args.virtual, expert_ids=many))
    table = model.adapters["users"].table
    grown = rss_bytes() - before
    results["bank_10000"] = {
        "table_bytes": table.numel() * table.element_size(),
        "rss_growth_bytes": grown,
        "parameters": len(list(model.adapters["users"].parameters())),
    }
    print(
        f"10,000-expert bank: table {table.numel() * table.element_size() / 2**20:.1f} MiB, "
        f"process grew {grown / 2**20:.1f} MiB, {results['bank_10000']['parameters']} parameter tensor"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
