"""Held-out metrics for answers that a program can check: exact match, overall and per task family."""

from __future__ import annotations

from lit_ft.data.gold import extract_answer


def normalise_answer(text: str) -> str:
    """What exact match compares: the answer a response gives in any of the embedded world's styles (the slot of a
    restating sentence, the text after ``Answer:``, or the first line), stripped of a final period."""
    return extract_answer(text)


def exact_match(prediction: str, reference: str) -> bool:
    """True when `prediction` gives the answer `reference` gives, whatever the style of either ("7", "Answer: 7",
    "3 plus 4 is 7." all give 7): on the embedded tasks, exactly the gold judge's rank >= 1."""
    return normalise_answer(prediction) == normalise_answer(reference)


def per_task_counts(right: list[bool], tasks: list[str | None]) -> dict[str, tuple[int, int]]:
    """(right, total) per task family, sorted by name; empty when the prompts name no task."""
    counts: dict[str, list[int]] = {}
    for ok, task in zip(right, tasks):
        if task is not None:
            pair = counts.setdefault(task, [0, 0])
            pair[0] += int(ok)
            pair[1] += 1
    return {task: (r, n) for task, (r, n) in sorted(counts.items())}
