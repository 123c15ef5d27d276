"""``peftkit bench personas``: seed 001's table on the persona benchmark (``peftkit.bench.personas``).

Six ways to answer each persona, all on one frozen base model, in this order (later rows build on
the unified LoRA trained first)::

    unified LoRA                 one LoRA on every persona's rows, no persona information
    per-persona LoRA             one LoRA per persona, its 30 rows only (optionally on a subset)
    cluster LoRA                 one LoRA per cluster, the cluster's rows
    cluster prompt               a soft prompt per cluster on the frozen unified LoRA (one bank)
    per-persona prompt           a soft prompt per persona on the frozen unified LoRA (one bank)
    hierarchical prompt          cluster prompt (frozen, from the row above) + a persona prompt

Each bank trains every expert in one run exactly as if alone (``ExpertData``); each LoRA trains in
a run of its own. Every persona's held-out examples are scored by comparing the `` yes`` and
`` no`` next-token logits, each row routed to its own experts; the table reports mean ± std of
per-persona accuracy, trainable parameters per persona and training wall time.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from peftkit import LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.bench.common import load_average, per_group_accuracy, routed_predictions, train
from peftkit.bench.personas import ANSWERS, PersonaData, persona_data, reference_accuracies
from peftkit.data.experts import ExpertData
from peftkit.data.formatters import get_formatter
from peftkit.data.pipeline import TokenizedData
from peftkit.data.sources import MemorySource
from peftkit.experts.hierarchy import ExpertHierarchy
from peftkit.models.loading import DEFAULT_MODEL, load_base
from peftkit.training.config import TrainingConfig


@dataclass
class PersonaBenchSettings:
    """What ``peftkit bench personas`` runs (CLI flags of the same names)."""

    model: str = DEFAULT_MODEL
    personas: int = 200
    clusters: int = 5
    train_per_persona: int = 30
    test_per_persona: int = 20
    lora_personas: int | None = None
    """Per-persona LoRAs on the first this many personas only (``None``: all); said in the table."""
    tokens: int = 10
    """Virtual tokens per soft prompt (cluster and persona alike)."""
    lora_rank: int = 8
    lora_lr: float = 1e-3
    prompt_lr: float = 3e-2
    unified_epochs: int = 2
    epochs: int = 5
    """Epochs of every per-persona and per-cluster run (LoRA and prompt alike)."""
    persona_batch_size: int = 2
    """Rows per step of each persona's own run (seed 001's setting)."""
    group_batch_size: int = 8
    """Rows per step of the unified and cluster runs."""
    micro_batch_size: int = 32
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (bfloat16 autocast for every training run; weights and optimisers fp32)."""
    seed: int = 0
    device: str = "auto"
    output: Path = Path("runs/bench-personas")
    progress: bool = False

    def __post_init__(self) -> None:
        counts = ("personas", "clusters", "train_per_persona", "test_per_persona", "tokens", "lora_rank")
        counts += ("unified_epochs", "epochs", "persona_batch_size", "group_batch_size", "micro_batch_size")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lora_personas is not None and not 1 <= self.lora_personas <= self.personas:
            raise ValueError(f"--lora-personas must be in [1, {self.personas}], got {self.lora_personas}")


QUICK = {"personas": 16, "test_per_persona": 10, "lora_personas": 4, "unified_epochs": 1, "epochs": 2}
"""``--quick``: a smoke run (CI runs it on a tiny random model)."""


@dataclass
class MethodResult:
    method: str
    accuracy: dict[str, float]
    """Per-persona accuracy on held-out examples."""
    params_per_persona: int
    train_seconds: float
    note: str = ""
    load: str = field(default_factory=load_average)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracy.values())

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracy.values())


def run_persona_bench(settings: PersonaBenchSettings, console: Console | None = None) -> dict[str, Any]:
    """Build the data, train the six rows, write ``table.md``, ``results.json`` and ``accuracy.png``."""
    console = console or Console()
    torch.manual_seed(settings.seed)
    data = persona_data(
        settings.personas, settings.clusters, settings.train_per_persona, settings.test_per_persona, seed=settings.seed
    )
    console.print(
        f"{len(data.personas)} personas in {len(data.clusters)} clusters: {len(data.train)} training rows, "
        f"{len(data.test)} held-out rows (load {load_average()})"
    )
    base, tokenizer = load_base(settings.model, device=settings.device)
    lora = lora_config(settings)
    model = get_peft_model(base, lora, "unified")
    runs = Runs(settings, data, model, tokenizer, console)
    results = [runs.unified(), runs.persona_loras(lora), runs.cluster_loras(lora)]
    results += [runs.cluster_prompts(), runs.persona_prompts(), runs.hierarchical()]
    return write_outputs(settings, data, results, console)


def lora_config(settings: PersonaBenchSettings) -> LoraConfig:
    """Every LoRA of the table (unified, per persona, per cluster): rank ``lora_rank`` on q and v."""
    return LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, target_modules=["q_proj", "v_proj"])


class Runs:
    """The six rows; each trains, scores and returns a :class:`MethodResult`."""

    def __init__(self, settings: PersonaBenchSettings, data: PersonaData, model, tokenizer, console: Console):
        self.s, self.data, self.model, self.tokenizer, self.console = settings, data, model, tokenizer, console
        self.formatter = get_formatter("prompt_completion")

    def config(self, lr: float, epochs: int, batch_size: int) -> TrainingConfig:
        return TrainingConfig(
            lr=lr, epochs=epochs, batch_size=batch_size, warmup_ratio=0.1, scheduler="linear",
            max_grad_norm=1.0, seed=self.s.seed, eval_at_end=False, precision=self.s.precision,
        )  # fmt: skip

    def tokenized(self, records: list[dict], batch_size: int) -> TokenizedData:
        source = MemorySource(records)
        return TokenizedData(source, self.formatter, self.tokenizer, batch_size=batch_size, seed=self.s.seed)

    def score(self, records: list[dict], route) -> dict[str, float]:
        predicted = routed_predictions(self.model, self.tokenizer, records, route, list(ANSWERS.values()))
        return per_group_accuracy(records, predicted, "persona")

    def report(self, result: MethodResult) -> MethodResult:
        self.console.print(
            f"  {result.method}: {result.mean:.2%} ± {result.std:.2%} over {len(result.accuracy)} personas, "
            f"{result.train_seconds:.0f} s (load {result.load})"
        )
        return result

    def unified(self) -> MethodResult:
        s = self.s
        seconds = train(self.model, self.tokenized(self.data.train, s.group_batch_size),
                        self.config(s.lora_lr, s.unified_epochs, s.group_batch_size), s.progress)  # fmt: skip
        adapter = self.model.adapters["unified"]
        params = adapter.num_parameters()
        adapter.freeze()
        accuracy = self.score(self.data.test, lambda r: {"unified": 0})
        return self.report(MethodResult("unified LoRA", accuracy, params, seconds, "one LoRA shared by all"))

    def _separate_loras(self, lora: LoraConfig, groups: dict[str, list[str]], key: str, batch_size: int):
        """One LoRA per group (trained alone, scored, deleted): per-persona accuracy, params, seconds."""
        accuracy: dict[str, float] = {}
        seconds, params = 0.0, 0
        for group, personas in groups.items():
            name = f"lora_{group}"
            self.model.add_adapter(name, lora)
            self.model.set_adapter(name)
            rows = [r for r in self.data.train if r[key] == group]
            config = self.config(self.s.lora_lr, self.s.epochs, batch_size)
            seconds += train(self.model, self.tokenized(rows, batch_size), config, self.s.progress)
            params = self.model.adapters[name].num_parameters()
            test = [r for r in self.data.test if r["persona"] in personas]
            accuracy |= self.score(test, lambda r, name=name: {name: 0})
            self.model.delete_adapter(name)
        self.model.set_adapter("unified")
        return accuracy, params, seconds

    def persona_loras(self, lora: LoraConfig) -> MethodResult:
        personas = [p.id for p in self.data.personas][: self.s.lora_personas]
        groups = {p: [p] for p in personas}
        accuracy, params, seconds = self._separate_loras(lora, groups, "persona", self.s.persona_batch_size)
        total = len(self.data.personas)
        note = f"subset: first {len(personas)} of {total} personas" if len(personas) < total else ""
        if note:
            seconds = seconds * total / len(personas)
            note += f"; time scaled to {total}"
        return self.report(MethodResult("per-persona LoRA", accuracy, params, seconds, note))

    def cluster_loras(self, lora: LoraConfig) -> MethodResult:
        groups = {c: [p.id for p in self.data.personas if p.cluster == c] for c in self.data.clusters}
        accuracy, params, seconds = self._separate_loras(lora, groups, "cluster", self.s.group_batch_size)
        return self.report(MethodResult("cluster LoRA", accuracy, params, seconds, "one LoRA per cluster"))

    def _bank(self, name: str, ids: list[str], expert_field: str, route, batch_size: int) -> tuple[float, int]:
        """Add a prompt bank ``name``, train every expert in one run, freeze it; (seconds, params/expert)."""
        bank = self.model.add_adapter(name, PromptTuningConfig(num_virtual_tokens=self.s.tokens, expert_ids=ids))
        data = ExpertData(
            MemorySource(self.data.train), self.formatter, self.tokenizer, route=route, expert_field=expert_field,
            batch_size=batch_size, micro_batch_size=self.s.micro_batch_size, seed=self.s.seed,
        )  # fmt: skip
        seconds = train(self.model, data, self.config(self.s.prompt_lr, self.s.epochs, batch_size), self.s.progress)
        bank.freeze()
        return seconds, bank.num_parameters() // len(ids)

    def cluster_prompts(self) -> MethodResult:
        route = lambda r: {"unified": 0, "cluster": r["cluster"]}  # noqa: E731
        seconds, params = self._bank("cluster", self.data.clusters, "cluster", route, self.s.group_batch_size)
        self.cluster_seconds = seconds
        accuracy = self.score(self.data.test, route)
        return self.report(MethodResult("cluster prompt (on unified)", accuracy, params, seconds, "one bank"))

    def persona_prompts(self) -> MethodResult:
        route = lambda r: {"unified": 0, "persona": r["persona"]}  # noqa: E731
        ids = [p.id for p in self.data.personas]
        seconds, params = self._bank("persona", ids, "persona", route, self.s.persona_batch_size)
        accuracy = self.score(self.data.test, route)
        return self.report(MethodResult("per-persona prompt (on unified)", accuracy, params, seconds, "one bank"))

    def hierarchical(self) -> MethodResult:
        route = lambda r: {"unified": 0, "cluster": r["cluster"], "persona_h": r["persona"]}  # noqa: E731
        ids = [p.id for p in self.data.personas]
        seconds, params = self._bank("persona_h", ids, "persona", route, self.s.persona_batch_size)
        hierarchy = ExpertHierarchy(self.model, ["unified", "cluster", "persona_h"])
        resolve = lambda r: hierarchy.resolve([{"cluster": r["cluster"], "persona_h": r["persona"]}]).experts[0]  # noqa: E731
        accuracy = self.score(self.data.test, resolve)
        cluster = self.cluster_seconds
        note = f"persona prompt on the frozen cluster prompt; time includes the cluster run ({cluster:.0f} s)"
        return self.report(
            MethodResult("hierarchical prompt (cluster + persona)", accuracy, params, seconds + cluster, note)
        )


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability of a split at least this uneven between ``wins`` and
    ``losses`` if each were a fair coin (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(max(wins, losses), n + 1)) / 2**n
    return min(1.0, 2 * tail)


def versus(baseline: MethodResult, other: MethodResult) -> str:
    """``other`` against ``baseline`` on the personas both scored: mean difference in points, wins–ties–
    losses per persona, and the sign test's p."""
    shared = [p for p in other.accuracy if p in baseline.accuracy]
    if other is baseline or not shared:
        return ""
    diffs = [other.accuracy[p] - baseline.accuracy[p] for p in shared]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return (
        f"{100 * statistics.fmean(diffs):+.1f} pts ({wins}–{len(diffs) - wins - losses}–{losses}, "
        f"p={sign_test(wins, losses):.2g})"
    )


def markdown_table(results: list[MethodResult], references: dict[str, float]) -> str:
    lines = [
        "| method | accuracy (mean ± std over personas) | personas | trainable params per persona "
        "| train wall time | vs unified LoRA (per persona: wins–ties–losses, sign test) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.mean:.2%} ± {r.std:.2%} | {len(r.accuracy)} | {r.params_per_persona:,} "
            f"| {r.train_seconds:.0f} s (load {r.load}) | {versus(results[0], r)} | {r.note} |"
        )
    lines.append("")
    lines += [f"- reference, no training: {name} = {value:.2%}" for name, value in references.items()]
    return "\n".join(lines) + "\n"


def write_outputs(settings: PersonaBenchSettings, data: PersonaData, results: list[MethodResult], console: Console):
    references = reference_accuracies(data)
    folder = settings.output
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown_table(results, references)
    (folder / "table.md").write_text(text)
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "references": references,
        "methods": [asdict(r) | {"mean": r.mean, "std": r.std, "personas_scored": len(r.accuracy)} for r in results],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_accuracies(results, folder / "accuracy.png")
    table = Table(title=f"Persona benchmark ({len(data.personas)} personas, {len(data.clusters)} clusters)")
    for column in ("method", "accuracy", "personas", "params/persona", "train s", "note"):
        table.add_column(column)
    for r in results:
        table.add_row(r.method, f"{r.mean:.2%} ± {r.std:.2%}", str(len(r.accuracy)), f"{r.params_per_persona:,}",
                      f"{r.train_seconds:.0f}", r.note)  # fmt: skip
    console.print(table)
    for name, value in references.items():
        console.print(f"reference (no training): {name} = {value:.2%}")
    console.print(f"written: {folder / 'table.md'}, {folder / 'results.json'}, {folder / 'accuracy.png'}")
    return summary


def plot_accuracies(results: list[MethodResult], path: Path) -> None:
    """Box plot of per-persona accuracy, one box per method."""
    from peftkit.evaluation.plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(10, 4.5))
    axes.boxplot([list(r.accuracy.values()) for r in results], showmeans=True)
    axes.set_xticks(range(1, len(results) + 1), [r.method.replace(" (", "\n(") for r in results], fontsize=8)
    axes.set_ylabel("held-out accuracy per persona")
    axes.set_ylim(0, 1)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
