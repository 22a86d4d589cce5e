"""Fixtures shared by the tool tests."""

from __future__ import annotations

import pytest

from tests.quantised_loading import save_wider_base


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tokenizer) -> str:
    """A tiny base whose shape no test adapter fits."""
    return save_wider_base(tmp_path_factory.mktemp("other_base") / "wide", tokenizer)
