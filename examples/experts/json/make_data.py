"""Writes train.jsonl and heldout.jsonl for the JSON expert (deterministic; run from any folder).

Each record is one chat: a short text about a person and an instruction to return name, age and
city as JSON; the assistant answers with compact JSON. Held-out records use names, cities and
sentence templates that never occur in training.

    python examples/experts/json/make_data.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Karl", "Laura",
         "Mallory", "Niaj", "Olivia", "Peggy", "Quentin", "Rupert", "Sybil", "Trent", "Uma", "Victor"]  # fmt: skip
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Dublin", "Oslo", "Prague", "Warsaw", "Athens"]
HELD_NAMES = ["Walter", "Xena", "Yusuf", "Zoe", "Amara", "Bruno", "Chloe", "Diego"]
HELD_CITIES = ["Tokyo", "Lima", "Nairobi", "Toronto", "Sydney", "Cairo"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "In {city} there is a {age} year old named {name}.",
    "Our new colleague {name} is {age}; she works from {city}.",
]
HELD_TEMPLATES = [
    "{city} is home to {name}, who turned {age} this spring.",
    "Last week {name}, aged {age}, flew back to {city}.",
]
INSTRUCTION = "Return the person's name, age and city as a JSON object with keys name, age, city.\nText: "


def record(rng: random.Random, names: list[str], cities: list[str], templates: list[str]) -> dict:
    person = {"name": rng.choice(names), "age": rng.randint(18, 90), "city": rng.choice(cities)}
    text = rng.choice(templates).format(**person)
    answer = json.dumps(person, separators=(",", ":"))
    return {"messages": [{"role": "user", "content": INSTRUCTION + text}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(0)
    train = [record(rng, NAMES, CITIES, TEMPLATES) for _ in range(240)]
    held = [record(rng, HELD_NAMES, HELD_CITIES, HELD_TEMPLATES) for _ in range(50)]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {HERE / name} ({len(rows)} records)")


if __name__ == "__main__":
    main()
