"""bench/style_probe.py's reward-model check: which pairs of a policy's samples it judges, and how it counts."""

from __future__ import annotations

import importlib.util

from tests.tiny_models import ROOT


def _style_probe():
    spec = importlib.util.spec_from_file_location("style_probe", ROOT / "bench" / "style_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_of_samples_are_the_ones_the_gold_judge_ranks_differently() -> None:
    samples = {
        ("add", "What is 3 + 4?"): {"7 is the sum of 3 and 4.", "7", "8"},  # gold ranks 2, 1, 0
        ("sort", "Sort the digits: 3 1 2"): {"1 3 2", "2 1 3"},  # both wrong: a tie, no pair
        ("max", "What is the largest of 5 9 2?"): {"9", "Answer: 9"},  # both rank 1: no pair
    }
    judged = []

    def by_length(question: str, response: str) -> float:  # a proxy that prefers long answers
        judged.append(response)
        return float(len(response))

    tally = _style_probe().pairwise_tally(samples, by_length)
    # 2 > 1 and 2 > 0: the sentence is longest (right); 1 > 0: "7" and "8" tie, which counts as wrong
    assert tally == {"all": [2, 3], "add": [2, 3], "2>1": [1, 1], "2>0": [1, 1], "1>0": [0, 1]}
    assert set(judged) == {"7 is the sum of 3 and 4.", "7", "8"}
