"""The persona benchmark: its rules (against hand-written verdicts) and quick mode end to end."""

import json

import pytest

from peftkit.bench.personas import ANSWERS, Persona, persona_data, reference_accuracies
from peftkit.cli.main import main
from peftkit.data.rotten_tomatoes import Review
from tests.training.conftest import write_tiny_folder

SHORT_FRESH = Review("A sharp, moving film.", "positive", "m")
SHORT_ROTTEN = Review("A dull mess.", "negative", "m")
LONG_FRESH = Review(" ".join(["word"] * 25) + " great", "positive", "m")
FUNNY_ROTTEN = Review("Not funny at all.", "negative", "m")  # mentions the humor topic


@pytest.mark.parametrize(
    ("stance", "topic_verdict", "expected"),
    [   # SHORT_FRESH, SHORT_ROTTEN, LONG_FRESH, FUNNY_ROTTEN
        ("follower", True, [True, False, True, True]),
        ("contrarian", False, [False, True, False, False]),
        ("enthusiast", False, [True, True, True, False]),
        ("grump", True, [False, False, False, True]),
        ("skimmer", False, [True, False, False, False]),
    ],
)  # fmt: skip
def test_verdicts_follow_the_cluster_rule_unless_the_topic_decides(stance, topic_verdict, expected):
    persona = Persona("p000", "c0", stance, "humor", topic_verdict)
    reviews = [SHORT_FRESH, SHORT_ROTTEN, LONG_FRESH, FUNNY_ROTTEN]
    assert [persona.verdict(r) for r in reviews] == expected


def reviews(n: int = 400) -> list[Review]:
    topics = ["funny", "plot", "actors", "love", "kids", "director", "visual", "horror", "dull"]
    labels = ("positive", "negative")
    return [Review(f"{topics[i % 9]} review {i} " + "x " * (i % 30), labels[i % 2], "m") for i in range(n)]


def test_data_is_seeded_sized_and_keeps_test_reviews_out_of_training():
    data = persona_data(10, 5, train_per_persona=10, test_per_persona=5, topic_fraction=0.4, seed=3, reviews=reviews())
    again = persona_data(10, 5, train_per_persona=10, test_per_persona=5, topic_fraction=0.4, seed=3, reviews=reviews())
    assert data == again
    assert [p.cluster for p in data.personas] == [f"c{k % 5}" for k in range(10)]
    assert len(data.train) == 100 and len(data.test) == 50
    assert not {r["text"] for r in data.train} & {r["text"] for r in data.test}
    by_id = {p.id: p for p in data.personas}
    for row in data.train + data.test:
        review = Review(row["text"], row["critic"], "m")
        assert row["completion"] == ANSWERS[by_id[row["persona"]].verdict(review)]
    mine = [r for r in data.train if r["persona"] == "p000"]
    from peftkit.bench.personas import TOPICS, words

    assert sum(bool(TOPICS[by_id["p000"].topic] & words(r["text"])) for r in mine) == 4  # 40% of 10


def test_a_review_only_model_cannot_reach_the_cluster_rule():
    data = persona_data(20, 5, train_per_persona=5, test_per_persona=20, seed=0, reviews=reviews(2000))
    references = reference_accuracies(data)
    assert references["review only"] < references["cluster rule only"] - 0.1


def test_quick_mode_writes_the_table_on_a_tiny_model(tmp_path):
    tiny = write_tiny_folder(tmp_path / "tiny")
    out = tmp_path / "bench"
    args = ["bench", "personas", "--quick", "--model", str(tiny), "--output", str(out), "--device", "cpu",
            "--personas", "5", "--train-per-persona", "4", "--test-per-persona", "2", "--lora-personas", "2",
            "--epochs", "1"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    methods = [m["method"] for m in summary["methods"]]
    assert methods == [
        "unified LoRA", "per-persona LoRA", "cluster LoRA", "cluster prompt (on unified)",
        "per-persona prompt (on unified)", "hierarchical prompt (cluster + persona)",
    ]  # fmt: skip
    for method in summary["methods"]:
        expected = 2 if method["method"] == "per-persona LoRA" else 5
        assert method["personas_scored"] == expected
        assert all(0 <= a <= 1 for a in method["accuracy"].values())
        assert method["params_per_persona"] > 0 and method["train_seconds"] > 0
    assert "subset: first 2 of 5" in summary["methods"][1]["note"]
    prompt = summary["methods"][4]["params_per_persona"]
    assert prompt == 10 * 32  # 10 virtual tokens × hidden size 32
    table = (out / "table.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ")]) == 7  # header + 6 methods
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_settings_name_the_flag_they_reject():
    from peftkit.bench.persona_table import PersonaBenchSettings

    with pytest.raises(ValueError, match="--lora-personas must be in"):
        PersonaBenchSettings(personas=4, lora_personas=0)
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        PersonaBenchSettings(epochs=0)


@pytest.mark.parametrize(
    ("wins", "losses", "expected"),
    [(9, 1, 2 * 11 / 1024), (1, 9, 2 * 11 / 1024), (5, 5, 1.0), (0, 0, 1.0), (6, 0, 2 / 64), (12, 3, 2 * 576 / 32768)],
)
def test_sign_test_is_the_two_sided_binomial_tail(wins, losses, expected):
    from peftkit.bench.persona_table import sign_test

    # 9 of 10: C(10,9) + C(10,10) = 11 outcomes at least as uneven on one side; 12 of 15: 455 + 105 + 15 + 1 = 576
    assert sign_test(wins, losses) == pytest.approx(expected)


def test_versus_counts_wins_ties_and_losses_per_persona():
    from peftkit.bench.persona_table import MethodResult, versus

    unified = MethodResult("unified LoRA", {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}, 1, 1.0)
    other = MethodResult("prompt", {"a": 0.75, "b": 1.0, "c": 0.5, "d": 0.25}, 1, 1.0)
    # differences +25, +50, 0, -25 points: mean +12.5; 2 wins, 1 tie, 1 loss; sign test on 2 vs 1: p = 1
    assert versus(unified, other) == "+12.5 pts (2–1–1, p=1)"
    assert versus(unified, unified) == ""
