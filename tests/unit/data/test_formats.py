"""Rendering and tokenizing records: templates, label masks, errors, and the real Alpaca subset."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lit_ft.data.formats import (
    IGNORE_INDEX,
    detect_format,
    format_alpaca_prompt,
    format_prompt,
    record_segments,
    tokenize_record,
)
from lit_ft.data.packing import ExampleStore, pack, packed_stats
from lit_ft.data.sources import DataError, Location, load_records_with_locations
from tests.tiny_models import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_5000.json"
needs_alpaca = pytest.mark.skipif(not ALPACA.exists(), reason=f"real Alpaca subset not found at {ALPACA}")

SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def supervised_spans(example: dict) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def check_invariants(example: dict, tokenizer) -> None:
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


def test_alpaca_templates_render_exactly(tokenizer) -> None:
    with_input = record_segments({"instruction": "Sum.", "input": "1 2", "output": "3"}, tokenizer)
    assert with_input[0].text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n"
        "### Input:\n1 2\n\n### Response:\n"
    )
    no_input = record_segments({"instruction": "Sum.", "input": "", "output": "3"}, tokenizer)
    assert no_input[0].text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSum.\n\n### Response:\n"
    )
    assert no_input[0].text == format_alpaca_prompt("Sum.")
    assert [s.supervised for s in no_input] == [False, True] and no_input[1].text == "3"


def test_alpaca_labels_mask_prompt_and_supervise_response_and_eos(tokenizer) -> None:
    record = {"instruction": "Name a fruit.", "input": "red", "output": "An apple."}
    example = tokenize_record(record, tokenizer)
    prompt = format_alpaca_prompt("Name a fruit.", "red")
    prompt_ids = enc(tokenizer, prompt)
    # Segments are cut at the boundary but tokenize like the whole string (no extra word-boundary marker).
    assert example["input_ids"] == [1, *enc(tokenizer, prompt + "An apple."), 2]
    response_ids = example["input_ids"][1 + len(prompt_ids):-1]
    assert example["input_ids"][1 : 1 + len(prompt_ids)] == prompt_ids
    assert example["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids + [2]
    assert tokenizer.decode(response_ids) == "An apple."
    check_invariants(example, tokenizer)


def test_chat_single_turn_builtin_template(tokenizer) -> None:
    record = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]}
    example = tokenize_record(record, tokenizer)
    assert example["input_ids"] == enc(tokenizer, "<s>[INST] Hello [/INST] Hi there.</s>")
    assert supervised_spans(example) == [enc(tokenizer, "Hi there.") + [2]]
    assert tokenizer.decode(example["input_ids"][1:-1]) == "[INST] Hello [/INST] Hi there."
    check_invariants(example, tokenizer)


def test_chat_multi_turn_supervises_only_assistant_turns(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    example = tokenize_record({"messages": messages}, tokenizer, format="chat")
    # Same ids as the whole conversation text tokenized at once, control tokens included.
    expected = "<s>[INST] Answer briefly.\n\nWhat is 2+2? [/INST] 4</s>[INST] And 3+3? [/INST] It is 6.</s>"
    assert example["input_ids"] == enc(tokenizer, expected)
    spans = supervised_spans(example)
    assert [tokenizer.decode(span[:-1]) for span in spans] == ["4", "It is 6."]
    assert all(span[-1] == tokenizer.eos_token_id for span in spans)
    check_invariants(example, tokenizer)


def test_chat_trailing_user_turn_is_ignored_and_roles_must_alternate(tokenizer) -> None:
    base = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    trailing = tokenize_record({"messages": [*base, {"role": "user", "content": "c"}]}, tokenizer)
    assert trailing == tokenize_record({"messages": base}, tokenizer)
    with pytest.raises(DataError, match=r"field 'messages\[1\].role': expected a 'assistant'"):
        tokenize_record({"messages": [base[0], base[0], base[1]]}, tokenizer)
    system = {"role": "system", "content": "s"}
    with pytest.raises(DataError, match=r"field 'messages\[2\].role': expected a 'assistant'"):
        tokenize_record({"messages": [system, base[0], base[0], base[1]]}, tokenizer)


def test_chat_template_path_from_tokenizer(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = SIMPLE_TEMPLATE
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell a joke."},
        {"role": "assistant", "content": "No."},
    ]
    example = tokenize_record({"messages": messages}, tok)
    check_invariants(example, tok)
    assert example["input_ids"].count(tok.bos_token_id) == 1  # the template's BOS text is not duplicated
    spans = supervised_spans(example)
    assert [tok.decode(span, skip_special_tokens=True) for span in spans] == ["Hello! How can I help?", "No."]
    assert [span[-1] for span in spans] == [2, 2]  # the template's EOS closes each supervised turn
    # Cutting at turn boundaries gives the same ids as tokenizing the rendered conversation whole.
    assert example["input_ids"] == enc(tok, tok.apply_chat_template(messages, tokenize=False))


def test_chat_template_argument_and_missing_eos(tokenizer) -> None:
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    example = tokenize_record(record, tokenizer, chat_template=chatml)
    check_invariants(example, tokenizer)  # an EOS is appended after the template's own end marker
    (span,) = supervised_spans(example)
    assert tokenizer.decode(span[:-1]) == "Yo<|im_end|>\n"
    builtin = tokenize_record(record, tokenizer, chat_template="builtin")
    assert builtin == tokenize_record(record, tokenizer)


def test_chat_template_that_is_not_prefix_stable(tokenizer) -> None:
    unstable = "{{ messages | length }} turns:{% for m in messages %} {{ m.content }}{% endfor %}"
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_record(record, tokenizer, chat_template=unstable, location=Location("c.jsonl", 5))


@pytest.mark.parametrize("chat_template", [None, SIMPLE_TEMPLATE])
def test_chat_prompt_ids_are_a_prefix_of_training_ids(tokenizer, chat_template) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    example = tokenize_record({"messages": messages}, tokenizer, chat_template=chat_template)
    prompt = format_prompt({"messages": messages}, tokenizer, chat_template=chat_template)
    assert prompt.reference == "Goodbye."
    n = len(prompt.input_ids)
    assert example["input_ids"][:n] == prompt.input_ids
    assert example["labels"][n - 1] == IGNORE_INDEX and example["labels"][n] != IGNORE_INDEX
    assert prompt.text.endswith("[INST] Bye [/INST]" if chat_template is None else "<|assistant|>\n")


def test_alpaca_and_prompt_completion_prompts(tokenizer) -> None:
    record = {"instruction": "Sum.", "input": "1 2", "output": "3"}
    prompt = format_prompt(record, tokenizer)
    assert prompt.text == format_alpaca_prompt("Sum.", "1 2") and prompt.reference == "3"
    assert tokenize_record(record, tokenizer)["input_ids"][: len(prompt.input_ids)] == prompt.input_ids
    pc = format_prompt({"prompt": "Q: 1+1?\nA:", "completion": "2"}, tokenizer)
    assert (pc.text, pc.reference, pc.input_ids[0]) == ("Q: 1+1?\nA:", "2", 1)
    chat = format_prompt({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}]}, tokenizer)
    assert (chat.text, chat.reference) == ("[INST] a [/INST] b</s>[INST] c [/INST]", None)
    assert chat.input_ids == enc(tokenizer, "<s>" + chat.text)
    with pytest.raises(DataError, match="no prompt"):
        format_prompt({"text": "raw"}, tokenizer)


def test_prompt_completion_and_text(tokenizer) -> None:
    pc = tokenize_record({"prompt": "Q: 1+1?\nA:", "completion": " 2"}, tokenizer)
    assert pc["input_ids"] == [1, *enc(tokenizer, "Q: 1+1?\nA: 2"), 2]
    (span,) = supervised_spans(pc)
    assert tokenizer.decode(span) == "2</s>"
    text = tokenize_record({"text": "Once upon a time."}, tokenizer)
    assert text["input_ids"] == [1, *enc(tokenizer, "Once upon a time."), 2]
    assert text["labels"] == [IGNORE_INDEX, *text["input_ids"][1:]]


def test_special_token_strings_in_data_stay_text(tokenizer) -> None:
    example = tokenize_record({"prompt": "say </s>", "completion": "<s> ok </s>"}, tokenizer)
    assert example["input_ids"].count(2) == 1 and example["input_ids"].count(1) == 1


def test_format_detection_and_unknown_format(tokenizer) -> None:
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"instruction": "a", "output": "b", "text": "c"}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a"}) == "text"
    with pytest.raises(DataError, match=r"^d\.jsonl:2: cannot detect the format from keys \(answer, question\)"):
        detect_format({"question": "q", "answer": "a"}, Location("d.jsonl", 2))
    with pytest.raises(DataError, match="unknown format 'sharegpt'"):
        tokenize_record({"text": "a"}, tokenizer, format="sharegpt")


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"instruction": "Do it."}, "alpaca", "d.jsonl:7: field 'output': missing"),
        ({"instruction": "Do it.", "output": 3}, "alpaca", "d.jsonl:7: field 'output': expected a string, got int"),
        ({"instruction": "Do it.", "output": "  "}, "alpaca", "d.jsonl:7: field 'output': empty response"),
        ({"instruction": "Do it.", "input": ["x"], "output": "ok"}, "alpaca",
         "d.jsonl:7: field 'input': expected a string, got list"),
        ({"prompt": "p", "completion": ""}, "prompt_completion", "d.jsonl:7: field 'completion': empty response"),
        ({"text": None}, "text", "d.jsonl:7: field 'text': missing"),
        ({"messages": "hi"}, "chat", "d.jsonl:7: field 'messages': expected a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "chat", "d.jsonl:7: field 'messages[0].role': unknown"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "chat",
         "d.jsonl:7: field 'messages[1].content': empty response"),
        ({"messages": [{"role": "user"}]}, "chat", "d.jsonl:7: field 'messages[0].content': missing"),
        ({"messages": [{"role": "user", "content": "x"}]}, "chat", "d.jsonl:7: field 'messages': no assistant"),
    ],
)
def test_field_errors_name_file_line_and_field(tokenizer, record, fmt, message) -> None:
    with pytest.raises(DataError) as info:
        tokenize_record(record, tokenizer, format=fmt, location=Location("d.jsonl", 7))
    assert str(info.value).startswith(message)


def test_error_from_file_names_its_line(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, locations = load_records_with_locations(str(path))
    with pytest.raises(DataError) as info:
        for record, location in zip(records, locations):
            tokenize_record(record, tokenizer, format="alpaca", location=location)
    assert str(info.value) == f"{path}:3: field 'output': missing"


@pytest.fixture(scope="module")
def alpaca_records() -> list[dict]:
    if not ALPACA.exists():
        pytest.skip(f"real Alpaca subset not found at {ALPACA}")
    records, _ = load_records_with_locations(str(ALPACA))
    return records[:1000]


@needs_alpaca
def test_real_alpaca_labels_and_packing_efficiency(tokenizer, alpaca_records) -> None:
    examples = [tokenize_record(r, tokenizer) for r in alpaca_records]
    same_as_whole = 0
    for record, example in zip(alpaca_records, examples):
        check_invariants(example, tokenizer)
        (span,) = supervised_spans(example)
        assert tokenizer.decode(span[:-1]).strip() == record["output"].strip()
        prompt = format_alpaca_prompt(record["instruction"], record["input"])
        same_as_whole += example["input_ids"] == [1, *enc(tokenizer, prompt + record["output"]), 2]
    assert same_as_whole >= 0.99 * len(examples)
    store = ExampleStore(examples)
    stats = packed_stats("alpaca[:1000]", store, pack(examples, 512), 512)
    print(f"\n{stats}")
    assert stats.packing_efficiency > 0.9
    assert 0.3 < stats.supervised_tokens / stats.tokens < 0.8


@needs_alpaca
def test_real_alpaca_as_chat(tokenizer, alpaca_records) -> None:
    for record in alpaca_records[:300]:
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        chat = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}
        example = tokenize_record(chat, tokenizer)
        check_invariants(example, tokenizer)
        (span,) = supervised_spans(example)
        assert tokenizer.decode(span[:-1]).strip() == record["output"].strip()
        assert example["input_ids"] == enc(tokenizer, f"<s>[INST] {user} [/INST] {record['output']}</s>")
        prompt = format_prompt(chat, tokenizer)
        assert example["input_ids"][: len(prompt.input_ids)] == prompt.input_ids
