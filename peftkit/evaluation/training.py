"""Task metrics during training: the ``evaluation`` section of a run config becomes the trainer's
``evaluate`` function.

At every evaluation (``training.eval_every`` and the end) the model — with the adapters it is
training — predicts on ``data.eval`` as :class:`~peftkit.evaluation.evaluator.Evaluation` does
for ``peftkit eval``; the values are logged as ``eval/<value>`` beside ``eval/loss`` and reach the
callbacks, so ``early_stopping`` and ``best_checkpoint`` can watch ``eval/accuracy`` or
``eval/f1_macro``. Undefined values (``None``) are left out of the log, and per-class values
(``f1/positive``) unless ``evaluation.per_class`` is set.
"""

from __future__ import annotations

from typing import Any

from peftkit.evaluation.evaluator import Evaluation
from peftkit.evaluation.records import examples_from_records

Evaluator = Any  # Callable[[model], dict[str, float]] (peftkit.training.trainer.Evaluator)


def task_evaluator(config: Any, tokenizer: Any, previous: Evaluator | None = None) -> Evaluator:
    """The ``evaluate(model) -> {name: value}`` function for a run config's ``evaluation`` section.

    Args:
        config: a :class:`~peftkit.training.config.RunConfig` with ``evaluation`` and ``data.eval``.
        previous: an evaluate function given by the caller; its values are merged in.
    """
    from peftkit.data.formatters import get_formatter
    from peftkit.data.sources import open_source

    section, data = config.evaluation, config.data
    formatter = get_formatter(data.formatter, tokenizer, **data.formatter_options)
    examples = examples_from_records(open_source(data.eval), formatter, name="data.eval")
    task = Evaluation(
        tokenizer, examples, section.prediction.build_predictor(), [m.spec for m in section.metrics],
        schema=section.prediction.schema(), batch_size=section.batch_size or data.eval_batch_size or
        config.training.batch_size, max_length=data.max_length, chat_template=section.prediction.chat_template,
    )  # fmt: skip

    task_values = task.evaluator(per_class=section.per_class)

    def evaluate(model: Any) -> dict[str, float]:
        values = task_values(model)
        if previous is not None:
            values.update(previous(model))
        return values

    return evaluate
