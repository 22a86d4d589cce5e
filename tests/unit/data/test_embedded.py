"""The embedded world as a record source: each stage config gives exactly the records it gave before the data
layer was restructured (hashes pinned from the code of commit 6dea0a6)."""

from __future__ import annotations

import hashlib
import importlib
import json

import pytest
import yaml

from tests.tiny_models import ROOT

# stage -> split -> (number of records, sha256 of the JSON records (first 16 hex), first record)
PINNED = {
    "pretrain": {
        "train": (1800, "d23b3b94dcd48398", {"text": "Q: Sort the digits: 9 1 0 A: 0 1 9. Q: Reverse the letters: n y j A: j y n. Read backwards, o x t becomes t x o. Q: Reverse the letters: p m q A: q m p. The digits 6 4 3 sorted are 3 4 6. The digits 7 0 8 sorted are 0 7 8."}),  # noqa: E501
        "val": (100, "7982121d4cbfaaae", {"text": "The sum 7 + 5 equals 12. Adding 7 and 5 gives 12. 7 plus 5 is 12. Q: What is 7 + 5? A: 12. There are 2 letters in h x. Counting h x gives 2 letters. h x has 2 letters. Q: How many letters are in: h x A: 2."}),  # noqa: E501
        "heldout": (200, "18543d420ceac230", {"instruction": "What number comes after 1?", "input": "", "output": "2", "task": "successor"}),  # noqa: E501
    },
    "sft": {
        "train": (2000, "560f4519cf239c3d", {"instruction": "What is the largest of 6 7 7?", "input": "", "output": "7", "task": "max"}),  # noqa: E501
        "val": (200, "18543d420ceac230", {"instruction": "What number comes after 1?", "input": "", "output": "2", "task": "successor"}),  # noqa: E501
    },
    "rm": {
        "train": (9787, "45d84b04910e179d", {"instruction": "What is the largest of 6 7 7?", "input": "", "chosen": "7", "rejected": "8", "task": "max"}),  # noqa: E501
        "val": (200, "31a3a0eb19f50c2f", {"instruction": "What number comes after 1?", "input": "", "chosen": "2", "rejected": "1", "task": "successor"}),  # noqa: E501
    },
    "ppo": {
        "train": (2535, "5d0fa0fb13d18fa0", {"instruction": "What is the largest of 6 7 7?", "input": "", "output": "7", "task": "max"}),  # noqa: E501
        "val": (200, "18543d420ceac230", {"instruction": "What number comes after 1?", "input": "", "output": "2", "task": "successor"}),  # noqa: E501
    },
}


def digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def stage_splits(stage: str) -> dict[str, list[dict]]:
    """The records the stage config's data module reads (old API: embedded_records)."""
    config = yaml.safe_load((ROOT / "configs" / f"{stage}.yaml").read_text())["data"]
    module, name = config["class_path"].rsplit(".", 1)
    dm = getattr(importlib.import_module(module), name)(**config.get("init_args", {}))
    train, val = dm.embedded_records()
    splits = {"train": train, "val": val}
    if stage == "pretrain":
        from lit_ft.data.synthetic import instruction_records, split_facts

        splits["heldout"] = instruction_records(split_facts(dm.world_seed, dm.num_train, dm.num_heldout)[1])
    return splits


@pytest.mark.parametrize("stage", sorted(PINNED))
def test_stage_configs_give_the_pinned_records(stage: str) -> None:
    splits = stage_splits(stage)
    assert set(splits) == set(PINNED[stage])
    for split, (count, pinned, first) in PINNED[stage].items():
        records = splits[split]
        assert (len(records), records[0]) == (count, first), f"{stage} {split}"
        assert digest(records) == pinned, f"{stage} {split}"
