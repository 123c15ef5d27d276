"""Metrics per expert, and their mean ± std over experts (many experts in one bank).

Examples are grouped by the expert they belong to (a record field, e.g. ``persona``). Each group is
evaluated with every active bank adapter routed to that group's expert (``PeftModel.use_experts``):
a bank holding the expert id applies it, one holding the row's ``cluster_field`` value applies that
(the hierarchical case), and a bank holding neither is left out for the group (the fallback: the
cluster prompt, or the unified model alone). Metrics are computed per group from its own counts;
the summary is the unweighted mean and the (population) standard deviation over groups, as in a
"mean accuracy ± std over personas" table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from peftkit.experts.bank import ExpertBank


@dataclass
class ExpertBreakdown:
    """One variant's metric values per expert.

    Attributes:
        values: expert id → metric values (as a variant's ``values``).
        examples: expert id → how many examples it had.
        levels: expert id → what served it: ``expert``, ``cluster``, ``fallback`` (no bank applied) or
            ``base`` (the variant is the base model).
    """

    values: dict[str, dict[str, float | None]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    levels: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """Metric → ``{mean, std, min, max, experts}`` over the experts where it is defined."""
        keys = sorted({k for v in self.values.values() for k in v if "/" not in k})
        out = {}
        for key in keys:
            defined = [v[key] for v in self.values.values() if v.get(key) is not None]
            if defined:
                out[key] = {
                    "mean": statistics.fmean(defined),
                    "std": statistics.pstdev(defined) if len(defined) > 1 else 0.0,
                    "min": min(defined),
                    "max": max(defined),
                    "experts": len(defined),
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "per_expert": self.values, "examples": self.examples, "levels": self.levels}


def expert_groups(records: Sequence[Mapping[str, Any]], field_name: str) -> dict[str, list[int]]:
    """Expert id → indices of its records, in order of first appearance; a record without it is an error."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        value = record.get(field_name)
        if value in (None, ""):
            raise ValueError(f"record {index} has no {field_name!r} (experts.field)")
        groups.setdefault(str(value), []).append(index)
    return groups


def bank_routes(model: Any, expert: str, cluster: str | None) -> tuple[dict[str, str | None], str]:
    """Each active bank's expert for a group, and the level that served it (``base``: adapters off)."""
    routes: dict[str, str | None] = {}
    if getattr(model, "_adapters_disabled", False):
        return routes, "base"
    level = "fallback"
    for name in getattr(model, "active_adapters", ()):
        adapter = model.adapters[name]
        if not isinstance(adapter, ExpertBank):
            continue
        if expert in adapter.experts:
            routes[name], level = expert, "expert"
        elif cluster is not None and cluster in adapter.experts:
            routes[name] = cluster
            level = "cluster" if level == "fallback" else level
        else:
            routes[name] = None
    return routes, level


def evaluate_per_expert(
    task: Any,
    model: Any,
    groups: Mapping[str, Sequence[int]],
    *,
    adapters: Any,
    clusters: Mapping[str, str] | None = None,
) -> ExpertBreakdown:
    """Run ``task`` (an :class:`~peftkit.evaluation.evaluator.Evaluation`) once per expert group."""
    from peftkit.evaluation.evaluator import Evaluation, variant_scope

    breakdown = ExpertBreakdown()
    with variant_scope(model, adapters):
        for expert, indices in groups.items():
            routes, level = bank_routes(model, expert, (clusters or {}).get(expert))
            sub = Evaluation(
                task.tokenizer, [task.examples[i] for i in indices], task.predictor, task.metrics,
                schema=task.schema, batch_size=task.batch_size, max_length=task.max_length,
                chat_template=task.chat_template,
            )  # fmt: skip
            with model.use_experts(routes):
                predictions = sub.predict(model, progress=False)
            values = {}
            for result in sub.score(predictions).values():
                values.update(result.values)
            breakdown.values[expert] = {k: _finite(v) for k, v in values.items()}
            breakdown.examples[expert] = len(indices)
            breakdown.levels[expert] = level
    return breakdown


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def breakdown_table(breakdowns: Mapping[str, ExpertBreakdown], title: str = "Per expert: mean ± std") -> Table:
    """Variants × metrics, each cell ``mean ± std`` over experts."""
    keys = sorted({k for b in breakdowns.values() for k in b.summary()})
    table = Table(title=title)
    table.add_column("variant")
    table.add_column("experts", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    for variant, breakdown in breakdowns.items():
        summary = breakdown.summary()
        cells = [f"{summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}" if k in summary else "—" for k in keys]
        table.add_row(variant, str(len(breakdown.values)), *cells)
    return table
