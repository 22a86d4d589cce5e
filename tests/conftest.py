"""Shared test fixtures: the real Mistral-7B-v0.1 sentencepiece tokenizer, built offline."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:  # tests run against the checkout, installed or not
    sys.path.insert(0, str(ROOT))
# Tests never touch the network; make the hub libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Mistral-7B-v0.1 tokenizer from the copy shipped in mistral_common; pad = unk (id 0), distinct from EOS."""
    import mistral_common
    from transformers import AutoTokenizer

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    directory = tmp_path_factory.mktemp("mistral_tokenizer")
    shutil.copy(src, directory / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.pad_token = tok.unk_token
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    return tok


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: use `make test-all` (pytest --runslow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
