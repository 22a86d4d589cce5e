"""`lit-ft pairs`: a policy's samples ranked by a judge become preference pairs (every two distinct responses the
judge ranks differently), seeded, written whole, from held-out-free prompts, in the records the reward model reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_ft.backbone import Backbone, build_model, save_adapter, save_full_model
from lit_ft.data.formats import Prompt
from lit_ft.data.preference_formats import detect_preference_format
from lit_ft.data.synthetic import split_facts
from lit_ft.errors import ConfigError
from lit_ft.rl.rewards import GoldReward
from lit_ft.tools.pairs import embedded_rows, load_judge, main, pair_prompt, ranked_pairs
from tests.quantised_loading import fails_in_one_line, sft_model_with_random_b
from tests.tiny_models import TINY


class LengthJudge:
    """A judge for the tests: longer responses are better."""

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        return torch.tensor([float(len(r)) for r in responses])


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tokenizer) -> str:
    tmp = tmp_path_factory.mktemp("pairs")
    torch.manual_seed(0)
    base = str(save_full_model(build_model(Backbone(tiny=TINY, lora=None), tokenizer), tmp / "base", tokenizer))
    return str(save_adapter(sft_model_with_random_b(base, tokenizer), tmp / "adapter", "sft", tokenizer))


def test_ranked_pairs_by_hand() -> None:
    sentence = "7 is the sum of 3 and 4."
    responses = ["7", "8", "7", sentence, "9"]
    scores = [1, 0, 1, 2, 0]
    assert ranked_pairs(responses, scores) == [
        ("7", "8", 1.0, 0.0), (sentence, "7", 2.0, 1.0), ("7", "9", 1.0, 0.0), (sentence, "8", 2.0, 0.0),
        (sentence, "9", 2.0, 0.0)]  # 8 and 9 tie: no pair; the second "7" is the first one
    assert ranked_pairs(["a", "a", "b"], [0, 5, 1]) == [("b", "a", 1.0, 0.0)]  # a repeat keeps its first score
    assert ranked_pairs(["a", "b"], [1, 1]) == [] and ranked_pairs(["a"], [3]) == []
    nan, inf = float("nan"), float("inf")
    assert ranked_pairs(["a", "b", "c", "d"], [nan, 1, nan, inf]) == []  # unscored responses are not compared
    assert ranked_pairs(["a", "b", "c"], [nan, 1, 0]) == [("b", "c", 1.0, 0.0)]


def test_pair_prompts_render_as_the_policy_was_prompted(tokenizer) -> None:
    """An Alpaca prompt stays instruction + input; a chat prompt becomes the conversation before the answer; both
    are read back by the preference formats as the same prompt tokens the policy saw."""
    from lit_ft.data.preference_formats import tokenize_pair
    from lit_ft.tools.generate import build_prompts

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Sum 3 and 4"}, {"role": "assistant", "content": "7"}]
    assert pair_prompt({"instruction": "Q", "input": "x", "task": "t", "output": "A"}, "alpaca") == {
        "instruction": "Q", "input": "x", "task": "t"}
    assert pair_prompt({"prompt": "Q"}, "alpaca") == {"instruction": "Q", "input": ""}
    assert pair_prompt({"messages": messages}, "chat") == {"prompt": messages[:3]}
    for row, fmt in (({"instruction": "What is 3 + 4?", "input": ""}, "alpaca"), ({"messages": messages}, "chat")):
        [prompt] = build_prompts([row], tokenizer, fmt, "builtin" if fmt == "chat" else None)
        record = {**pair_prompt(row, fmt), "chosen": "7", "rejected": "8"}
        pair = tokenize_pair(record, tokenizer, chat_template="builtin" if fmt == "chat" else None)
        assert pair.prompt_ids == prompt.input_ids, fmt


def test_the_judge_is_a_class_path_and_a_bad_one_is_a_config_error() -> None:
    assert isinstance(load_judge("lit_ft.rl.rewards.GoldReward"), GoldReward)
    for path in ("no_such_module.Judge", "lit_ft.rl.rewards.NoSuchJudge", "GoldReward", "lit_ft.data.gold.TASKS"):
        with pytest.raises(ConfigError, match="--judge"):
            load_judge(path)


def test_embedded_prompts_never_ask_a_heldout_question() -> None:
    train_facts, heldout = split_facts(1234, 2000, 200)
    held = {f.question for f in heldout}
    rows, _ = embedded_rows("train", 500)
    questions = [r["instruction"] for r in rows]
    assert not held & set(questions)
    assert questions[: len(train_facts)] == [f.question for f in train_facts]
    assert 0 < len(questions) - len(train_facts) <= 500  # fresh questions, minus those the world already asks
    rows, _ = embedded_rows("heldout", 0)
    assert {r["instruction"] for r in rows} == held and all("task" in r for r in rows)


def test_pairs_of_a_policy_are_ranked_seeded_and_read_as_preference_records(tiny_adapter, tmp_path: Path,
                                                                          capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": q, "input": "", "task": "t"}) + "\n"
                               for q in ("What is 3 + 4?", "Reverse the letters: c a t", "Sort the digits: 3 1 2")))
    args = ["--adapter", tiny_adapter, "--file", str(prompts), "--judge", f"{__name__}.LengthJudge",
            "--samples", "4", "--temperature", "1.0", "--max_new_tokens", "6", "--batch_size", "2"]
    counts = main([*args, "--out", str(tmp_path / "a.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert counts["prompts"] == 3 and counts["pairs"] == len(records) > 0
    for r in records:
        assert r["chosen_score"] == len(r["chosen"]) > r["rejected_score"] == len(r["rejected"])
        assert r["input"] == "" and r["task"] == "t" and detect_preference_format(r) == "alpaca"
    for question in {r["instruction"] for r in records}:  # K distinct lengths give K(K-1)/2 pairs
        own = [r for r in records if r["instruction"] == question]
        lengths = {len(r[k]) for r in own for k in ("chosen", "rejected")}
        assert len(own) >= len(lengths) * (len(lengths) - 1) // 2
    assert f"{counts['pairs']} pairs from 3 prompts" in capsys.readouterr().out
    main([*args, "--out", str(tmp_path / "b.jsonl")])
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()  # seeded
    main([*args, "--seed", "7", "--out", str(tmp_path / "c.jsonl")])
    assert (tmp_path / "c.jsonl").read_text() != (tmp_path / "a.jsonl").read_text()
    assert not list(tmp_path.glob("*.partial"))


def test_a_crash_leaves_no_pairs_file(tiny_adapter, tmp_path: Path, monkeypatch) -> None:
    """Make reads the file as done: a run that dies part-way leaves only OUT.partial."""
    from lit_ft.tools import pairs

    calls = []

    def failing_judge(prompts, responses):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("judge died")
        return torch.zeros(len(responses))

    monkeypatch.setattr(pairs, "load_judge", lambda path: failing_judge)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    with pytest.raises(RuntimeError, match="judge died"):
        main(["--adapter", tiny_adapter, "--file", str(prompts), "--batch_size", "1", "--max_new_tokens", "3",
              "--out", str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists() and (tmp_path / "out.jsonl.partial").exists()


class ShortJudge:
    """A broken judge: one score too few."""

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        return [0.0] * (len(responses) - 1)


def test_a_judge_that_scores_too_few_responses_fails_in_one_line(tiny_adapter, capsys, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    fails_in_one_line(capsys, ["pairs", "--adapter", tiny_adapter, "--file", str(prompts), "--max_new_tokens", "2",
                               "--judge", f"{__name__}.ShortJudge", "--out", str(tmp_path / "o.jsonl")],
                      f"--judge {__name__}.ShortJudge: gave 7 scores for 8 responses")


@pytest.mark.parametrize(("extra", "expected"), [
    (["--samples", "1"], "--samples must be at least 2"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--max_prompts", "0"], "--max_prompts must be at least 1"),
    (["--embedded", "heldout", "--extra_facts", "10"], "--extra_facts adds training questions"),
    (["--judge", "no_such_module.Judge"], "--judge no_such_module.Judge: cannot build it"),
    (["--out", "/proc/no_such_dir/o.jsonl"], "--out /proc/no_such_dir/o.jsonl: cannot write it"),
])
def test_bad_settings_fail_in_one_line_before_loading(extra, expected, capsys, tmp_path: Path) -> None:
    source = [] if "--embedded" in extra else ["--embedded", "train"]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o.jsonl")]
    fails_in_one_line(capsys, ["pairs", "--adapter", str(tmp_path / "missing"), *source, *extra, *out], expected)
