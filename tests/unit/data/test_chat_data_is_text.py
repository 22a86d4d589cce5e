"""Chat data is text: special-token strings inside message contents (a literal ``</s>``) never become control
tokens, on any path (SFT examples, generation prompts, preference pairs), with a Jinja chat template too. Only the
template's own markup writes control tokens. Real Mistral-7B-v0.1 tokenizer (tests/conftest.py)."""

from __future__ import annotations

import pytest

from lit_ft.data.formats import IGNORE_INDEX, format_prompt, tokenize_record
from lit_ft.data.preference_formats import tokenize_pair
from lit_ft.data.sources import DataError

# Zephyr-like: every turn closed by the template's own EOS text, as many real templates do.
ZEPHYR = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TRIMMING = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}"
            "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
HOSTILE = "Say </s> then <s> and <unk>.</s>"


def _messages(content: str = HOSTILE) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"System {content}"}, {"role": "user", "content": content},
            {"role": "assistant", "content": f"Answer {content}"}]


def _eos(ids: list[int], tokenizer) -> int:
    return ids.count(tokenizer.eos_token_id)


def _clean(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same conversation with harmless contents: its EOS ids are all the template's (or the final one)."""
    return [dict(m, content="x") for m in messages]


@pytest.mark.parametrize("template", [ZEPHYR, TRIMMING, "builtin"], ids=["eos-markup", "trimming", "builtin"])
def test_special_token_text_in_messages_stays_text_in_training_examples(template, tokenizer) -> None:
    messages = _messages()
    example = tokenize_record({"messages": messages}, tokenizer, chat_template=template)
    clean = tokenize_record({"messages": _clean(messages)}, tokenizer, chat_template=template)
    ids, labels = example["input_ids"], example["labels"]
    assert _eos(ids, tokenizer) == _eos(clean["input_ids"], tokenizer)  # no EOS from the data
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.unk_token_id) == 0
    supervised = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    clean_supervised = [token for token, label in zip(clean["input_ids"], clean["labels"]) if label != IGNORE_INDEX]
    assert _eos(supervised, tokenizer) == _eos(clean_supervised, tokenizer)  # none supervised mid-answer
    text = tokenizer.decode([t for t in supervised if t != tokenizer.eos_token_id])
    assert f"Answer {HOSTILE}" in text  # the data's characters, spelled out as text tokens


def test_clean_data_tokenizes_as_the_whole_rendering(tokenizer) -> None:
    """The rendering is cut at the template's control tokens (and the answer's start) only: without
    special-token text in the data, the ids are those of tokenizing the rendered conversation at once."""
    messages = _messages("Hello, how are you?")
    example = tokenize_record({"messages": messages}, tokenizer, chat_template=ZEPHYR)
    whole = tokenizer.encode(tokenizer.apply_chat_template(messages, chat_template=ZEPHYR, tokenize=False),
                             add_special_tokens=False)
    assert example["input_ids"] == whole + [tokenizer.eos_token_id]  # the final supervised EOS after "\n"


def test_generation_prompts_and_preference_pairs_keep_data_as_text(tokenizer) -> None:
    messages = _messages()[:2]
    prompt = format_prompt({"messages": messages}, tokenizer, chat_template=ZEPHYR)
    clean = format_prompt({"messages": _clean(messages)}, tokenizer, chat_template=ZEPHYR)
    assert _eos(prompt.input_ids, tokenizer) == _eos(clean.input_ids, tokenizer) == 2  # the template's two
    pair = tokenize_pair({"prompt": HOSTILE, "chosen": f"Yes {HOSTILE}", "rejected": "No"}, tokenizer,
                         chat_template=ZEPHYR)
    harmless = tokenize_pair({"prompt": "x", "chosen": "x", "rejected": "x"}, tokenizer, chat_template=ZEPHYR)
    assert _eos(pair.prompt_ids, tokenizer) == _eos(harmless.prompt_ids, tokenizer)
    assert _eos(pair.chosen_ids, tokenizer) == _eos(pair.rejected_ids, tokenizer) == _eos(harmless.chosen_ids,
                                                                                           tokenizer)
    alpaca = tokenize_record({"instruction": HOSTILE, "output": HOSTILE}, tokenizer)
    assert _eos(alpaca["input_ids"], tokenizer) == 1


def test_a_template_that_rewrites_contents_is_refused_in_one_line(tokenizer) -> None:
    upper = "{% for m in messages %}<|{{ m.role }}|>{{ m.content | upper }}{{ eos_token }}{% endfor %}"
    with pytest.raises(DataError, match=r"messages\[0\].content.*changes the content of message 0"):
        tokenize_record({"messages": _messages("hi")[1:]}, tokenizer, chat_template=upper)
