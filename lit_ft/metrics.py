"""Held-out metrics for answers that a program can check: exact match, overall and per task family."""

from __future__ import annotations


def normalise_answer(text: str) -> str:
    """What exact match compares: the first line, stripped of surrounding space and a final period."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].strip() if line.endswith(".") else line


def exact_match(prediction: str, reference: str) -> bool:
    """True when the first line of `prediction` is exactly `reference` (up to whitespace and a final period)."""
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
