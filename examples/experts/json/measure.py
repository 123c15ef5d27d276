"""Schema compliance of the JSON expert on its held-out tasks: base model, soft prompt, soft prompt + grammar.

    python examples/experts/json/measure.py runs/experts/json-expert-0.1.0.expert [--limit 50]

Every case decodes with the expert's manifest settings (temperature, top_p, seed, max_new_tokens);
the grammar is dropped for the first two. An output complies when the whole text (stripped) is
JSON that validates against the manifest's schema; "exact" also needs the reference object.
Writes a Markdown table to stdout, the per-example outputs to ``compliance.json`` beside the expert,
and an evaluation report (``report.json``: variants ``base`` and ``expert`` = soft prompt + grammar,
as the manifest decodes) to ``<training.output_dir>/eval/``, where ``peftkit package`` picks it up so
that ``validate`` checks the quality targets against it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema
import torch

from peftkit.experts.load import load_expert

HERE = Path(__file__).parent


def score(text: str, schema: dict, reference: dict) -> tuple[bool, bool]:
    try:
        value = json.loads(text.strip())
        jsonschema.validate(value, schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False, False
    return True, value == reference


def left_padded(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (length - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def run_case(expert, prompts, settings, adapters_on: bool, batch_size: int) -> tuple[list[str], float]:
    tokenizer, model = expert.tokenizer, expert.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = left_padded(prompts[i : i + batch_size], pad)
        seed = None if settings.seed is None else settings.seed + i
        call = {"decoding": settings.model_copy(update={"seed": seed}), "tokenizer": tokenizer, "pad_token_id": pad}
        with torch.no_grad():
            if adapters_on:
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **call)
            else:
                with model.disable_adapter():
                    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **call)
        new = out[:, batch["input_ids"].shape[1] :]
        outputs += [tokenizer.decode(row, skip_special_tokens=True) for row in new]
    return outputs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("expert", type=Path)
    parser.add_argument("--data", type=Path, default=HERE / "heldout.jsonl")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    expert = load_expert(args.expert)
    settings = expert.manifest.decoding
    schema = settings.grammar.json_schema
    records = [json.loads(line) for line in args.data.read_text().splitlines()][: args.limit]
    prompts = [
        expert.tokenizer.apply_chat_template(r["messages"][:1], tokenize=True, add_generation_prompt=True)
        for r in records
    ]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    references = [json.loads(r["messages"][1]["content"]) for r in records]
    free = settings.model_copy(update={"grammar": None})
    cases = [("base model", free, False), ("soft prompt", free, True), ("soft prompt + grammar", settings, True)]
    rows, details = [], {}
    for name, decoding, adapters_on in cases:
        outputs, seconds = run_case(expert, prompts, decoding, adapters_on, args.batch_size)
        scores = [score(o, schema, r) for o, r in zip(outputs, references, strict=True)]
        compliant, exact = sum(s[0] for s in scores), sum(s[1] for s in scores)
        rows.append(f"| {name} | {compliant}/{len(outputs)} ({compliant / len(outputs):.0%}) | "
                    f"{exact}/{len(outputs)} ({exact / len(outputs):.0%}) | {seconds:.0f} s |")  # fmt: skip
        details[name] = [{"output": o, "compliant": s[0], "exact": s[1]} for o, s in zip(outputs, scores, strict=True)]
        print(rows[-1], flush=True)
    table = ["| case | schema compliance | exact object | time |", "|---|---|---|---|", *rows]
    print("\n".join(table))
    (args.expert.parent / "compliance.json").write_text(json.dumps(details, indent=1) + "\n")
    write_report(details, Path(expert.manifest.training.output_dir) / "eval" / "report.json", expert)


def write_report(details: dict, path: Path, expert) -> None:
    """The subset of peftkit's evaluation report that quality targets read (variants → values)."""

    def values(rows: list[dict]) -> dict:
        return {"schema_compliance": sum(r["compliant"] for r in rows) / len(rows),
                "exact_match": sum(r["exact"] for r in rows) / len(rows)}  # fmt: skip

    adapters = list(expert.model.active_adapters)
    variants = {
        "base": {"adapters": None, "examples": len(details["base model"]), "values": values(details["base model"])},
        "expert": {"adapters": adapters, "examples": len(details["soft prompt + grammar"]),
                   "values": values(details["soft prompt + grammar"])},
    }  # fmt: skip
    info = {
        "soft prompt without grammar": values(details["soft prompt"]),
        "data": "examples/experts/json/heldout.jsonl",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": ["schema_compliance", "exact_match"], "variants": variants, "info": info},
                               indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
