"""Seeded persona data over real ``rotten_tomatoes`` reviews: who is asking changes the answer.

Each example asks "will *I* like this movie?" about a real review snippet. The answer is the
persona's verdict, ``" yes"`` or ``" no"``, which depends on who the persona is::

    verdict(persona, review) =
        persona.topic_verdict            if the review mentions persona.topic   (persona quirk)
        cluster_stance(review)           otherwise                              (cluster rule)

Cluster stance rules (5 clusters, personas dealt round-robin):

    c0 follower     agrees with the critic          (fresh -> yes, rotten -> no)
    c1 contrarian   disagrees with the critic       (fresh -> no,  rotten -> yes)
    c2 enthusiast   likes every movie               (yes)
    c3 grump        dislikes every movie            (no)
    c4 skimmer      agrees with the critic on short reviews (<= 18 words), disagrees on long ones

Persona quirk: one topic from :data:`TOPICS` (a set of words, matched as whole lower-case words)
and a fixed verdict on any review that mentions it (an enthusiast's quirk is always a dislike, a
grump's always a like, so that every quirk changes answers). ``topic_fraction`` of each persona's
examples mention its topic, so 30 examples hold about 12 where the quirk decides.

The prompt carries no persona information. A model that sees only the review cannot tell a
follower from a contrarian, or an enthusiast from a grump, so a unified model that pools every
persona tops out near the best single answer per review; the cluster explains most of the rest and
the persona's topic the remainder. Training and test reviews come from disjoint halves of the
corpus, so no test review was seen in training by any persona.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from peftkit.data.rotten_tomatoes import Review, load_reviews

PROMPT = "Review: {text}\nWill I like this movie? Answer:"
"""The question every persona asks; the answer is `` yes`` or `` no``."""
ANSWERS = {True: " yes", False: " no"}
SHORT_REVIEW_WORDS = 18
"""The skimmer cluster's threshold (the corpus median is 18 words)."""

STANCES = ("follower", "contrarian", "enthusiast", "grump", "skimmer")
TOPICS: dict[str, frozenset[str]] = {
    name: frozenset(words.split())
    for name, words in {
        "acting": "performance performances acting actor actors actress cast",
        "humor": "funny comedy laughs humor jokes hilarious",
        "story": "story plot script narrative writing",
        "director": "director directed direction filmmaker filmmakers",
        "visuals": "visual visually effects cinematography images look",
        "genre": "horror scary thriller suspense action",
        "romance": "love romantic romance heart",
        "family": "kids children family animated animation",
    }.items()
}


@dataclass(frozen=True)
class Persona:
    """One simulated user: a cluster (stance rule) and a quirk (topic and verdict on it)."""

    id: str
    cluster: str
    stance: str
    topic: str
    topic_verdict: bool

    def verdict(self, review: Review) -> bool:
        """Whether this persona likes the movie the review is about."""
        if TOPICS[self.topic] & words(review.text):
            return self.topic_verdict
        return stance_verdict(self.stance, review)


@dataclass(frozen=True)
class PersonaData:
    """The benchmark's personas and their examples (records with ``prompt``, ``completion``,
    ``persona``, ``cluster``, ``label``)."""

    personas: list[Persona]
    train: list[dict[str, str]]
    test: list[dict[str, str]]

    @property
    def clusters(self) -> list[str]:
        return sorted({p.cluster for p in self.personas})


@functools.cache
def words(text: str) -> frozenset[str]:
    """The lower-case words of ``text`` (cached: every review is looked at many times)."""
    return frozenset(re.findall(r"[a-z]+", text.lower()))


def stance_verdict(stance: str, review: Review) -> bool:
    """The cluster rule alone (see the module docstring)."""
    fresh = review.label == "positive"
    if stance == "follower":
        return fresh
    if stance == "contrarian":
        return not fresh
    if stance == "enthusiast":
        return True
    if stance == "grump":
        return False
    if stance == "skimmer":
        return fresh if len(review.text.split()) <= SHORT_REVIEW_WORDS else not fresh
    raise ValueError(f"unknown stance {stance!r}; known: {', '.join(STANCES)}")


def make_personas(count: int, clusters: int = 5, seed: int = 0) -> list[Persona]:
    """``count`` personas dealt round-robin into ``clusters`` clusters (at most 5: one per stance)."""
    if not 1 <= clusters <= len(STANCES):
        raise ValueError(f"clusters must be in [1, {len(STANCES)}], got {clusters}")
    if count < clusters:
        raise ValueError(f"personas ({count}) must be at least clusters ({clusters})")
    rng = random.Random(seed)
    personas = []
    for k in range(count):
        stance = STANCES[k % clusters]
        topic = rng.choice(sorted(TOPICS))
        verdict = {"enthusiast": False, "grump": True}.get(stance, rng.random() < 0.5)
        personas.append(Persona(f"p{k:03d}", f"c{k % clusters}", stance, topic, verdict))
    return personas


def persona_data(
    personas: int = 200,
    clusters: int = 5,
    train_per_persona: int = 30,
    test_per_persona: int = 20,
    topic_fraction: float = 0.4,
    seed: int = 0,
    reviews: Sequence[Review] | None = None,
) -> PersonaData:
    """Build the benchmark (deterministic in ``seed``); ``reviews`` defaults to ``rotten_tomatoes``."""
    if not 0 <= topic_fraction <= 1:
        raise ValueError(f"topic_fraction must be in [0, 1], got {topic_fraction}")
    if train_per_persona < 1 or test_per_persona < 1:
        raise ValueError("train_per_persona and test_per_persona must be at least 1")
    train_half, test_half = review_halves(reviews if reviews is not None else load_reviews(), seed)
    halves = {"train": train_half, "test": test_half}
    people = make_personas(personas, clusters, seed)
    rng = random.Random(seed + 1)
    out: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for split, size in (("train", train_per_persona), ("test", test_per_persona)):
        mentions = {t: [r for r in halves[split] if TOPICS[t] & words(r.text)] for t in TOPICS}
        others = {t: [r for r in halves[split] if not TOPICS[t] & words(r.text)] for t in TOPICS}
        for persona in people:
            on_topic = min(round(size * topic_fraction), len(mentions[persona.topic]))
            chosen = rng.sample(mentions[persona.topic], on_topic) + rng.sample(others[persona.topic], size - on_topic)
            rng.shuffle(chosen)
            out[split] += [record(persona, review) for review in chosen]
    return PersonaData(people, out["train"], out["test"])


def review_halves(reviews: Sequence[Review], seed: int) -> tuple[list[Review], list[Review]]:
    """The reviews shuffled with ``seed`` and halved: (training half, held-out half)."""
    pool = list(reviews)
    random.Random(seed).shuffle(pool)
    return pool[: len(pool) // 2], pool[len(pool) // 2 :]


def record(persona: Persona, review: Review) -> dict[str, str]:
    return {
        "prompt": PROMPT.format(text=review.text),
        "completion": ANSWERS[persona.verdict(review)],
        "persona": persona.id,
        "cluster": persona.cluster,
        "critic": review.label,
        "text": review.text,
    }


def reference_accuracies(data: PersonaData) -> dict[str, float]:
    """What simple rule-knowing predictors score on the test rows (no model involved).

    * ``review only``: for each review, the verdict most personas give it (the best any model can do
      without knowing who asks, on this persona population);
    * ``cluster rule only``: the persona's cluster stance, ignoring its topic quirk.
    """
    by_id = {p.id: p for p in data.personas}
    review_only = cluster_only = 0
    for row in data.test:
        review = Review(row["text"], row["critic"], "")
        yes = sum(p.verdict(review) for p in data.personas)
        majority = ANSWERS[2 * yes >= len(data.personas)]
        review_only += majority == row["completion"]
        cluster_only += ANSWERS[stance_verdict(by_id[row["persona"]].stance, review)] == row["completion"]
    return {"review only": review_only / len(data.test), "cluster rule only": cluster_only / len(data.test)}
