"""`lit-ft chat`: driven through a real pseudo-terminal as a person would use it (two turns, the second answered
with the first in its context; /reset; /exit), the templates a conversation is rendered in, the bounded history,
loading the base as trained, and faults in one line."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from lit_ft.backbone import Backbone, build_model, save_adapter, save_full_model
from lit_ft.backbone.base_record import BaseRecord
from lit_ft.data.formats import tokenize_record
from lit_ft.errors import ConfigError
from lit_ft.tools import chat
from lit_ft.tools.chat import Conversation, Turn, answer, render
from lit_ft.tools.generate import Sampling
from lit_ft.tools.loading import base_spec, load_with_adapter
from tests.quantised_loading import (
    LoadedBases,
    assert_nf4_bf16,
    fails_in_one_line,
    save_nf4_adapter,
    sft_model_with_random_b,
)
from tests.tiny_models import TINY

FIRST, SECOND = "What is 3 + 4?", "And twice that?"
NEW_TOKENS = 6
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tokenizer) -> str:
    """A tiny base and an Alpaca-trained LoRA adapter on it (non-zero B, so that it changes the output)."""
    tmp = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    base = str(save_full_model(build_model(Backbone(tiny=TINY, lora=None), tokenizer), tmp / "base", tokenizer))
    model = sft_model_with_random_b(base, tokenizer)
    record = BaseRecord(base, prompt_format="alpaca", stage="CausalLM")
    return str(save_adapter(model, tmp / "adapter", "sft", tokenizer, record))


def _expected_answers(adapter: str) -> dict[str, str]:
    """Greedy answers computed here, in-process: the first turn, the second after it, the second alone."""
    model, tokenizer = load_with_adapter(base_spec(BaseRecord.read(adapter).pretrained, BaseRecord.read(adapter)),
                                         adapter)
    sampling = Sampling(max_new_tokens=NEW_TOKENS)
    first = answer(model, tokenizer, render([], FIRST, tokenizer)[1], sampling, stream=False)
    after = answer(model, tokenizer, render([Turn(FIRST, first)], SECOND, tokenizer)[1], sampling, stream=False)
    alone = answer(model, tokenizer, render([], SECOND, tokenizer)[1], sampling, stream=False)
    return {"first": first, "second": after, "alone": alone}


def _turn(child, message: str) -> tuple[str, str]:
    """Send ``message``; (the context the chat showed, the answer it streamed) once it prompts again."""
    child.sendline(message)
    child.expect_exact("--- end of context ---")
    context = ANSI.sub("", child.before).replace("\r\n", "\n").split("tokens ---\n", 1)[1]
    child.expect_exact(chat.PROMPT)
    return context, ANSI.sub("", child.before).replace("\r\n", "\n").strip()


def test_two_turns_in_a_terminal_the_second_answered_with_the_first_then_reset_and_exit(adapter) -> None:
    pexpect = pytest.importorskip("pexpect", reason="pexpect is in the dev extra (pip install -e '.[dev]')")
    expected = _expected_answers(adapter)
    # the test can fail: with the first turn dropped, the model would answer the second differently
    assert expected["second"] != expected["alone"]
    lit_ft = Path(sys.executable).parent / "lit-ft"
    env = dict(os.environ, TERM="dumb", OMP_NUM_THREADS="1")  # dumb: readline writes no escape sequences
    child = pexpect.spawn(str(lit_ft), ["chat", "--adapter", adapter, "--max_new_tokens", str(NEW_TOKENS),
                                        "--show_context"], encoding="utf-8", timeout=300, env=env,
                          dimensions=(40, 400))
    try:
        child.expect_exact(chat.PROMPT)
        assert "alpaca template" in child.before  # the adapter's own template, from its lit_ft_base.json
        context, first = _turn(child, FIRST)
        assert FIRST in context and first == expected["first"]
        context, second = _turn(child, SECOND)
        assert context.index(FIRST) < context.index(first) < context.index(SECOND)  # the first turn, then this one
        assert second == expected["second"]

        child.sendline("/reset")
        child.expect_exact("(history cleared)")
        child.expect_exact(chat.PROMPT)
        context, again = _turn(child, SECOND)
        assert FIRST not in context and again == expected["alone"]

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# ------------------------------------------------------------------------------------------------ rendering
def test_alpaca_history_is_the_earlier_exchanges_as_trained_then_the_new_prompt(tokenizer) -> None:
    _, ids = render([Turn(FIRST, "7")], SECOND, tokenizer, "alpaca")
    exchange = tokenize_record({"instruction": FIRST, "output": "7"}, tokenizer, "alpaca")["input_ids"]
    _, alone = render([], SECOND, tokenizer, "alpaca")
    assert exchange[-1] == tokenizer.eos_token_id
    assert ids == exchange + alone[1:]  # one BOS, the training tokens of the first exchange, the new prompt


def test_chat_history_is_the_conversation_in_inst_turns(tokenizer) -> None:
    text, ids = render([Turn(FIRST, "7")], SECOND, tokenizer, "chat", "builtin")
    assert text == f"[INST] {FIRST} [/INST] 7</s>[INST] {SECOND} [/INST]"
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_the_oldest_turns_are_dropped_to_fit_the_budget(tokenizer) -> None:
    one = len(render([Turn(FIRST, "7")], SECOND, tokenizer)[1])
    conversation = Conversation(tokenizer, "alpaca", None, budget=one)
    conversation.add("Say hello.", "hello")
    conversation.add(FIRST, "7")
    text, ids, dropped = conversation.context(SECOND)
    assert dropped == 1 and len(ids) == one and "Say hello." not in text and FIRST in text
    assert conversation.turns == [Turn(FIRST, "7")]  # dropped for good
    conversation.budget = 5
    with pytest.raises(ConfigError, match="over the 5-token budget"):
        conversation.context(SECOND)


def _run_in_process(monkeypatch, capsys, args: list[str], lines: list[str]) -> tuple[list[Turn], str]:
    typed = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    turns = chat.main(args)
    captured = capsys.readouterr()
    return turns, captured.err + captured.out  # the first line (how the model loaded) is on stderr


def test_the_chat_says_when_it_drops_turns(adapter, monkeypatch, capsys) -> None:
    _, out = _run_in_process(monkeypatch, capsys, ["--adapter", adapter, "--max_new_tokens", "6", "--max_context",
                                                   "80"], [FIRST, SECOND])
    assert "(history: dropped the 1 oldest turn to fit the 74-token budget; 0 kept)" in out


def test_a_4bit_trained_chat_adapter_loads_its_base_in_4bit_and_renders_chat_turns(adapter, tokenizer, tmp_path,
                                                                                    monkeypatch, capsys) -> None:
    nf4 = save_nf4_adapter(tmp_path / "nf4", BaseRecord.read(adapter).pretrained, tokenizer, prompt_format="chat")
    loaded = LoadedBases(monkeypatch)
    turns, out = _run_in_process(monkeypatch, capsys, ["--adapter", nf4, "--max_new_tokens", "3", "--show_context"],
                                 [FIRST, SECOND, "/exit", "never read"])
    assert_nf4_bf16(loaded)
    assert f"[INST] {FIRST} [/INST] {turns[0].assistant}</s>[INST] {SECOND} [/INST]" in out
    assert [t.user for t in turns] == [FIRST, SECOND]


def test_a_merged_model_chats_in_the_template_its_export_names(tokenizer, tmp_path, monkeypatch, capsys) -> None:
    torch.manual_seed(0)
    merged = str(save_full_model(build_model(Backbone(tiny=TINY, lora=None), tokenizer), tmp_path / "merged", tokenizer,
                                 metadata={"prompt_format": "chat", "chat_template": "builtin"}))
    turns, out = _run_in_process(monkeypatch, capsys, ["--model", merged, "--max_new_tokens", "2", "--show_context"],
                                 [FIRST, SECOND])
    assert "chat template" in out and f"[INST] {FIRST} [/INST] {turns[0].assistant}</s>[INST] {SECOND} [/INST]" in out


# ------------------------------------------------------------------------------------------------ faults
def test_a_missing_adapter_is_one_line(tmp_path, capsys) -> None:
    fails_in_one_line(capsys, ["chat", "--adapter", str(tmp_path / "nope")], "adapter directory not found")


def test_an_adapter_on_another_base_is_one_line(adapter, other_base, capsys) -> None:
    fails_in_one_line(capsys, ["chat", "--adapter", adapter, "--base", other_base],
                      "the adapter does not fit the base model")


def test_a_context_with_no_room_for_a_message_is_one_line(adapter, capsys) -> None:
    fails_in_one_line(capsys, ["chat", "--adapter", adapter, "--max_context", "64", "--max_new_tokens", "64"],
                      "--max_context 64 leaves no room for a message after --max_new_tokens 64")
