"""Choose ``peftkit bench personas`` hyperparameters on validation rows that never touch its test set.

The benchmark splits the shuffled ``rotten_tomatoes`` reviews in halves: training examples come from
the first half, held-out examples from the second. This script rebuilds the personas on the first
half alone (split again into its own training and validation reviews), so whatever it picks was
never scored on a test review. It trains the unified LoRA once per ``--unified-epochs`` value, then
a persona prompt bank per ``--prompt-lr`` × ``--epochs`` value on top of it, and prints the
validation accuracy of each::

    OMP_WAIT_POLICY=PASSIVE python scripts/tune_personas.py --personas 5 --prompt-lr 0.03 0.3
"""

from __future__ import annotations

import argparse

from rich.console import Console

from peftkit import get_peft_model
from peftkit.bench.persona_table import PersonaBenchSettings, Runs, lora_config
from peftkit.bench.personas import persona_data, reference_accuracies, review_halves
from peftkit.data.rotten_tomatoes import load_reviews
from peftkit.models.loading import DEFAULT_MODEL, load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--personas", type=int, default=5)
    parser.add_argument("--validation-per-persona", type=int, default=40)
    parser.add_argument("--unified-epochs", type=int, nargs="+", default=[2])
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--prompt-lr", type=float, nargs="+", default=[3e-2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    console = Console()
    train_half, _ = review_halves(load_reviews(), args.seed)  # the benchmark's own split
    data = persona_data(args.personas, test_per_persona=args.validation_per_persona, seed=args.seed, reviews=train_half)
    console.print(f"{len(data.train)} training rows, {len(data.test)} validation rows (training half only)")
    for name, value in reference_accuracies(data).items():
        console.print(f"reference (no training): {name} = {value:.2%}")
    for unified_epochs in args.unified_epochs:
        base, tokenizer = load_base(args.model)
        settings = PersonaBenchSettings(
            model=args.model, personas=args.personas, unified_epochs=unified_epochs, lora_lr=args.lora_lr,
            seed=args.seed,
        )  # fmt: skip
        model = get_peft_model(base, lora_config(settings), "unified")
        runs = Runs(settings, data, model, tokenizer, console)
        runs.unified()
        for lr in args.prompt_lr:
            for epochs in args.epochs:
                settings.prompt_lr, settings.epochs = lr, epochs
                result = runs.persona_prompts()
                console.print(
                    f"unified_epochs={unified_epochs} prompt_lr={lr:g} epochs={epochs}: validation "
                    f"{result.mean:.2%} ± {result.std:.2%}"
                )
                model.delete_adapter("persona")


if __name__ == "__main__":
    main()
