"""``peftkit bench serve``: many soft-prompt experts through the engine, against HF PEFT and the bare model.

Side by side in one process, on the same base model and the same requests (real review text from
the built-in ``rotten_tomatoes`` as prompts, greedy decoding, ``max_new_tokens`` each):

    engine    ``requests`` concurrent requests, each to a different prompt-tuning expert, submitted at
              once to :class:`~peftkit.serving.engine.Engine` (continuous batching, the experts'
              virtual-token keys/values computed once and reused);
    HF PEFT   the same requests one at a time: load the request's adapter, ``generate``, unload
              (how a PEFT user serves many adapters without a batching server);
    base      the same batch through the engine with no expert at all (the bare model): the cost
              the experts add is the ratio of the engine to this;
    LoRA      the same batch through the engine with LoRA experts gathered per row from a bank
              (rank ``lora_rank`` on the attention projections): a different LoRA per request,
              then one LoRA shared by every request. Equal times mean 32 distinct LoRAs cost one pass.

The engine runs the batch twice: first with every expert cold (its virtual-token keys/values
computed inside the run), then warm (cached, the steady state of a server). Every request generates
exactly ``max_new_tokens`` on every side (end-of-sequence is ignored), so all sides do the same work.
Latency of a request is from the moment all are submitted to its last token (in the PEFT loop a
request waits for every request before it). Throughput is generated tokens over wall time; the
fraction of the machine's fp32 matmul peak counts ``2N`` FLOPs per prompt or generated token (``N``
non-embedding parameters) plus the output projection per generated token.

Also measured: the prefill saving of soft-prompt KV reuse (prefill over the cached virtual-token
keys/values against recomputing them), and the memory and lookup time of a registry holding
``registered`` soft-prompt experts (one shared table; a lookup is one dict access).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from peftkit.bench.common import load_average, rss_bytes
from peftkit.bench.many_experts import flop_counts, matmul_peak, require_peft
from peftkit.models.loading import DEFAULT_MODEL, load_base


@dataclass
class ServeBenchSettings:
    """What ``peftkit bench serve`` runs (CLI flags of the same names)."""

    model: str = DEFAULT_MODEL
    requests: int = 32
    """Concurrent requests, each to its own soft-prompt expert."""
    tokens: int = 20
    """Virtual tokens per expert."""
    max_new_tokens: int = 32
    prompt_words: int = 24
    """Each prompt is the first this many words of a review."""
    registered: int = 10_000
    """Soft-prompt experts registered for the memory and routing measurement."""
    lora_rank: int = 8
    """Rank of the LoRA experts (on the attention projections) of the LoRA-bank measurement."""
    matmul_size: int = 2048
    seed: int = 0
    output: Path = Path("runs/bench-serve")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def review_prompts(count: int, words: int, seed: int) -> list[str]:
    """``count`` prompts from real reviews (rotten_tomatoes test split), in a seeded order."""
    from peftkit.data.rotten_tomatoes import load_reviews, train_test_split

    _, test = train_test_split(load_reviews(), seed=seed)
    return [f"Review: {' '.join(r.text.split()[:words])}\nWhat does the reviewer think?" for r in test[:count]]


def make_experts(base: torch.nn.Module, count: int, tokens: int, folder: Path, seed: int) -> list[str]:
    """Save ``count`` prompt-tuning experts (``SAMPLE_VOCAB`` init, each its own seed) as PEFT folders."""
    from peftkit import PromptTuningConfig, get_peft_model

    names = []
    for index in range(count):
        name = f"expert-{index:03d}"
        config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=tokens, prompt_tuning_init="SAMPLE_VOCAB", init_seed=seed + index
        )
        model = get_peft_model(base, config)
        model.save_pretrained(folder / name)
        model.unload() if hasattr(model, "unload") else None
        names.append(name)
    return names


def peft_in_turn(peft: Any, base: torch.nn.Module, tokenizer: Any, folders: list[Path], prompts: list[str], s) -> dict:
    """HF PEFT serving the requests one at a time: load the adapter, generate greedily, unload."""
    model = None
    latencies, generated, outputs = [], 0, []
    begin = time.perf_counter()
    for index, (folder, prompt) in enumerate(zip(folders, prompts, strict=True)):
        name = f"r{index}"
        if model is None:
            model = peft.PeftModel.from_pretrained(base, str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
            model.set_adapter(name)
        model.eval()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=s.max_new_tokens,
                min_new_tokens=s.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        generated += len(new)
        outputs.append(new)
        latencies.append(time.perf_counter() - begin)
        if index:
            model.delete_adapter(f"r{index - 1}")
    return {"seconds": time.perf_counter() - begin, "latencies": latencies, "tokens": generated, "outputs": outputs}


def engine_side(engine: Any, prompt_ids: list[list[int]], experts: list[Any], s: ServeBenchSettings) -> dict:
    """Submit every request at once to the running engine; per-request latency to its last token."""
    from peftkit.decoding import DecodingSettings
    from peftkit.serving.types import ServeRequest

    settings = DecodingSettings(max_new_tokens=s.max_new_tokens)
    finished: list[float] = [0.0] * len(prompt_ids)
    outputs: list[list[int]] = [[] for _ in prompt_ids]

    def wait(index: int, handle: Any) -> None:
        outputs[index] = list(handle.result().token_ids)
        finished[index] = time.perf_counter()

    begin = time.perf_counter()
    handles = [
        engine.submit(ServeRequest(f"r{i}", ids, expert, settings))
        for i, (ids, expert) in enumerate(zip(prompt_ids, experts, strict=True))
    ]
    waiters = [threading.Thread(target=wait, args=(i, h)) for i, h in enumerate(handles)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    return {
        "seconds": max(finished) - begin,
        "latencies": [t - begin for t in finished],
        "tokens": sum(len(o) for o in outputs),
        "outputs": outputs,
    }


def make_lora_experts(model_name: str, count: int, rank: int, folder: Path, seed: int) -> list[str]:
    """Save ``count`` LoRA experts (random factors, each its own seed) as PEFT folders, made on a
    base model of their own."""
    from peftkit import LoraConfig, get_peft_model

    base, _ = load_base(model_name)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    factors = [p for name, p in model.named_parameters() if "lora_" in name]
    names = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for p in factors:  # nonzero A and B: every expert changes every targeted projection
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        name = f"lora-{index:03d}"
        model.save_pretrained(folder / name)
        names.append(name)
    return names


def lora_bank_sides(base: Any, tokenizer: Any, prompt_ids: list[list[int]], s: ServeBenchSettings) -> dict:
    """The engine with LoRA experts gathered per row: one different LoRA per request, then one LoRA
    shared by every request (what a batch costs when it holds a single adapter)."""
    from peftkit.serving.engine import Engine
    from peftkit.serving.lora_bank import LoraBank
    from peftkit.serving.registry import ExpertRegistry

    with tempfile.TemporaryDirectory() as tmp:
        names = make_lora_experts(s.model, s.requests, s.lora_rank, Path(tmp), s.seed)
        bank = LoraBank(base)
        try:
            registry = ExpertRegistry(base, tokenizer, root=tmp, lora_bank=bank)
            registry.load_all()
            experts = [registry.get(name) for name in names]
            engine = Engine(base, tokenizer, lora_bank=bank, max_batch_size=s.requests, ignore_eos=True)
            engine.start()
            try:
                engine_side(engine, prompt_ids[:2], experts[:2], s)  # warm-up
                distinct = engine_side(engine, prompt_ids, experts, s)
                shared = engine_side(engine, prompt_ids, [experts[0]] * s.requests, s)
            finally:
                engine.stop(abort_pending=True)
        finally:
            bank.close()  # the base model is bare again
    return {"distinct": distinct, "shared": shared}


def summary(result: dict, flops: float, peak: float) -> dict:
    """Throughput, latency percentiles and the fraction of the matmul peak of one side."""
    return {
        "seconds": result["seconds"],
        "generated_tokens": result["tokens"],
        "tokens_per_second": result["tokens"] / result["seconds"],
        "p50_latency_s": percentile(result["latencies"], 50),
        "p99_latency_s": percentile(result["latencies"], 99),
        "gflops": flops / result["seconds"] / 1e9,
        "fraction_of_peak": flops / result["seconds"] / 1e9 / peak,
    }


def run_serve_bench(settings: ServeBenchSettings, console: Console | None = None) -> dict[str, Any]:
    """Run the three sides, the prefix-reuse and the registry measurements; write ``results.json``."""
    from peftkit.serving.engine import Engine
    from peftkit.serving.registry import ExpertRegistry

    console = console or Console()
    peft = require_peft()
    s = settings
    ours_base, tokenizer = load_base(s.model)
    theirs_base, _ = load_base(s.model)
    peak, _ = matmul_peak(s.matmul_size, torch.device("cpu"))
    console.print(f"matmul peak: {peak:.1f} GFLOP/s fp32 ({s.matmul_size}³; load {load_average()})")

    prompts = review_prompts(s.requests, s.prompt_words, s.seed)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    n, head = flop_counts(ours_base)
    generated = s.requests * s.max_new_tokens
    # useful work: every prompt token and every generated token once through the layers (2N each),
    # the output projection once per generated token; the experts' virtual tokens are not counted
    flops = 2 * n * (prompt_tokens + generated) + 2 * head * generated

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_experts(ours_base, s.requests, s.tokens, folder, s.seed)
        registry = ExpertRegistry(ours_base, tokenizer, root=folder, lora_bank=None)
        registry.load_all()
        experts = [registry.get(name) for name in names]
        # every request generates exactly max_new_tokens, on every side
        engine = Engine(ours_base, tokenizer, max_batch_size=s.requests, max_queue=s.requests, ignore_eos=True)
        engine.start()
        try:
            engine_side(engine, prompt_ids[:2], experts[:2], s)  # warm-up (allocator, oneDNN kernels)
            engine.prefix_store.clear()
            load = load_average()
            cold = engine_side(engine, prompt_ids, experts, s)
            console.print(
                f"engine, {s.requests} experts, their keys/values computed in the run: {cold['seconds']:.2f} s "
                f"(load {load} -> {load_average()})"
            )
            ours = engine_side(engine, prompt_ids, experts, s)
            console.print(f"engine, the same experts again (cached keys/values): {ours['seconds']:.2f} s")
            bare = engine_side(engine, prompt_ids, [None] * s.requests, s)
            console.print(f"engine, bare base model: {bare['seconds']:.2f} s (load {load_average()})")
        finally:
            engine.stop(abort_pending=True)
        load = load_average()
        theirs = peft_in_turn(peft, theirs_base, tokenizer, [folder / name for name in names], prompts, s)
        console.print(f"HF PEFT, one adapter at a time: {theirs['seconds']:.2f} s (load {load} -> {load_average()})")

    loras = lora_bank_sides(ours_base, tokenizer, prompt_ids, s)
    console.print(
        f"engine, {s.requests} different LoRA experts: {loras['distinct']['seconds']:.2f} s; one LoRA on every "
        f"row: {loras['shared']['seconds']:.2f} s (load {load_average()})"
    )

    from peftkit.serving.measure import prefill_saving

    saving = prefill_saving(ours_base, tokenizer, experts[0].soft_prompt, prompt_ids[0], batch_size=s.requests)
    reuse = {**asdict(saving), "speedup": saving.speedup, "saving": saving.saving, "text": saving.describe()}
    registered = registry_cost(ours_base, s)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "matmul_peak_gflops": peak,
        "prompt_tokens": prompt_tokens,
        "useful_gflop": flops / 1e9,
        "engine": summary(ours, flops, peak),
        "engine_cold": summary(cold, flops, peak),
        "base": summary(bare, flops, peak),
        "peft": summary(theirs, flops, peak),
        "lora_distinct": summary(loras["distinct"], flops, peak),
        "lora_shared": summary(loras["shared"], flops, peak),
        "prefix_reuse": reuse,
        "registry": registered,
        "load_average": load_average(),
    }
    result["speedup_vs_peft"] = result["engine"]["tokens_per_second"] / result["peft"]["tokens_per_second"]
    result["expert_overhead"] = result["base"]["tokens_per_second"] / result["engine"]["tokens_per_second"] - 1
    result["distinct_lora_cost"] = (
        result["lora_shared"]["tokens_per_second"] / result["lora_distinct"]["tokens_per_second"]
    )
    s.output.mkdir(parents=True, exist_ok=True)
    (s.output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (s.output / "table.md").write_text(markdown_table(result))
    print_result(result, console)
    return result


def registry_cost(base: torch.nn.Module, s: ServeBenchSettings) -> dict:
    """Memory and lookup time of ``s.registered`` soft-prompt experts in one bank folder.

    The bank is written here; a fresh process (``spawn``) loads the base model, then the registry,
    so its resident-memory difference is the registry's alone.
    """
    import multiprocessing

    from peftkit import PromptTuningConfig, get_peft_model

    ids = [f"p{i:05d}" for i in range(s.registered)]
    with tempfile.TemporaryDirectory() as tmp:
        bank = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=s.tokens, expert_ids=ids))
        bank.save_pretrained(Path(tmp) / "personas")
        del bank
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_measure_registry, (s.model, tmp, ids))


def _measure_registry(model_name: str, root: str, ids: list[str], lookups: int = 20_000) -> dict:
    from peftkit.serving.registry import ExpertRegistry

    base, tokenizer = load_base(model_name)
    before = rss_bytes()
    start = time.perf_counter()
    registry = ExpertRegistry(base, tokenizer, root=root, lora_bank=None)
    registry.load_all()
    for name in ids:  # every expert made once (bank experts are views, made on first use)
        registry.get(name)
    load_seconds = time.perf_counter() - start
    after = rss_bytes()
    order = torch.randint(len(ids), (lookups,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for index in order:
        registry.get(ids[index])
    lookup = (time.perf_counter() - start) / lookups
    few = ids[:32]
    start = time.perf_counter()
    for index in order:
        registry.get(few[index % len(few)])
    lookup_few = (time.perf_counter() - start) / lookups
    return {
        "experts": len(ids),
        "rss_added_mb": (after - before) / 2**20,
        "tensor_mb": registry.nbytes / 2**20,
        "load_seconds": load_seconds,
        "lookup_us": lookup * 1e6,
        "lookup_us_32_hot": lookup_few * 1e6,
    }


ROWS = (
    ("engine", "peftkit engine, warm experts"),
    ("engine_cold", "peftkit engine, cold experts"),
    ("peft", "HF PEFT, one adapter at a time"),
    ("base", "peftkit engine, bare model"),
    ("lora_distinct", "peftkit engine, a different LoRA per request"),
    ("lora_shared", "peftkit engine, one LoRA on every request"),
)
COLUMNS = ("run", "wall s", "tokens/s", "p50 latency s", "p99 latency s", "fraction of peak")


def result_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, label in ROWS:
        r = result[key]
        rows.append([
            label, f"{r['seconds']:.2f}", f"{r['tokens_per_second']:.1f}", f"{r['p50_latency_s']:.2f}",
            f"{r['p99_latency_s']:.2f}", f"{r['fraction_of_peak']:.1%}",
        ])  # fmt: skip
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in result_rows(result)]
    return "\n".join(lines) + "\n"


def print_result(result: dict[str, Any], console: Console) -> None:
    s = result["settings"]
    table = Table(title=f"{s['requests']} requests × {s['max_new_tokens']} new tokens, greedy ({s['model']})")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in result_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"engine / PEFT throughput: [bold]{result['speedup_vs_peft']:.2f}×[/] (goal ≥ 5×); expert overhead vs the "
        f"bare model: [bold]{result['expert_overhead']:+.1%}[/] (goal ≤ 15%); matmul peak "
        f"{result['matmul_peak_gflops']:.0f} GFLOP/s; load {result['load_average']}"
    )
    console.print(
        f"{s['requests']} different LoRA experts in one batch cost {result['distinct_lora_cost']:.2f}× one LoRA "
        f"shared by all rows (gathered per row from the bank)"
    )
    console.print(f"soft-prompt KV reuse: {result['prefix_reuse']['text']}")
    reg = result["registry"]
    console.print(
        f"{reg['experts']:,} registered soft-prompt experts: +{reg['rss_added_mb']:.0f} MB resident "
        f"({reg['tensor_mb']:.0f} MB of tensors; goal ≤ 500 MB), loaded in {reg['load_seconds']:.1f} s; "
        f"lookup {reg['lookup_us']:.2f} µs among {reg['experts']:,} vs {reg['lookup_us_32_hot']:.2f} µs among 32"
    )
