"""The held-out evaluation callback: figures and the before/after table by hand, the exact KL, the stage interface
(roles), the gold judge read from the data, and evaluation.json."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lit_ft.callbacks import evaluation
from lit_ft.callbacks.evaluation import (
    EvaluationRoles,
    GenerationTable,
    HeldoutResult,
    before_after_table,
    sequence_kl,
    stage_roles,
)
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.formats import Prompt, format_alpaca_prompt
from lit_ft.data.heldout import HeldOutItem


def test_heldout_summary_and_table_by_hand() -> None:
    result = HeldoutResult(texts=["a", "b", "c", "d"], tasks=["add", "add", "sort", "sort"],
                           right=[True, True, True, False], gold=[2.0, 1.0, 2.0, 0.0], gold_top=2.0,
                           reward_model=[1.0, 0.0, 0.5, -0.5], kl=[0.1, 0.3, 0.2, 0.0])
    s = result.summary()
    assert s["exact_match"] == 0.75 and s["gold_win_rate"] == 0.5 and s["preferred_share"] == pytest.approx(2 / 3)
    assert s["reward_model_score"] == 0.25 and s["gold_score"] == 1.25
    assert s["kl_mean"] == pytest.approx(0.15) and s["kl_max"] == 0.3
    assert s["gold_win_rate/add"] == 0.5 and s["exact_match/sort"] == 0.5 and s["reward_model_score/sort"] == 0.0
    assert s["kl_max/add"] == 0.3 and s["kl_mean/sort"] == pytest.approx(0.1)
    assert result.counts() == "add 2/2, sort 1/2"
    table = before_after_table({**s, "kl_mean": 0.0}, s, 4, ("SFT policy", "PPO policy"))
    assert "SFT policy" in table.splitlines()[0] and "gold win-rate" in table.splitlines()[2] and "50.0%" in table
    assert any(line.strip().startswith("sort: exact match") for line in table.splitlines())


def test_sequence_kl_by_hand() -> None:
    # KL of [0.5, 0.5] to [0.25, 0.75] is 0.5 ln 2 + 0.5 ln(2/3); the masked second position does not count
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    kl = sequence_kl(p, q, torch.tensor([[1, 0]]))
    assert float(kl) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert float(sequence_kl(p, p, torch.tensor([[1, 1]]))) == pytest.approx(0.0, abs=1e-7)


def test_a_stage_without_roles_is_evaluated_as_it_is_and_none_means_nothing_to_generate() -> None:
    plain = SimpleNamespace(model="m", tokenizer="t")
    roles = stage_roles(plain)
    assert (roles.model, roles.tokenizer, roles.reference, roles.scorer) == ("m", "t", None, None)
    assert stage_roles(SimpleNamespace(evaluation_roles=lambda: None)) is None


class _World:
    """A held-out data module of the embedded world: two prompts, their gold judge on the record source."""

    checkable = True
    source = EmbeddedWorld()

    def heldout(self) -> list[HeldOutItem]:
        return [HeldOutItem(Prompt(format_alpaca_prompt("What is 3 + 4?"), [1, 5], "7"), "7", "add", {}),
                HeldOutItem(Prompt(format_alpaca_prompt("Sort the digits: 3 1 2"), [1, 6], "1 2 3"), "1 2 3",
                            "sort", {})]


def test_gold_judge_reward_model_and_kl_reach_the_figures_and_evaluation_json(monkeypatch, tmp_path) -> None:
    answers = {"before": ["7", "1 2 3"], "after": ["7 is the sum of 3 and 4.", "3 2 1"]}
    tag = {"now": "before"}
    monkeypatch.setattr(evaluation, "generate_and_measure",
                        lambda roles, prompts, n, b: (answers[tag["now"]], [0.0, 0.0] if tag["now"] == "before"
                                                      else [0.4, 0.2], [0.1, 0.3]))
    written = {}
    monkeypatch.setattr(evaluation, "write_json", lambda trainer, name, data: written.update({name: data}))
    module = SimpleNamespace(evaluation_roles=lambda: EvaluationRoles(
        None, None, reference=lambda: None, scorer=lambda ids, mask: None, names=("SFT policy", "PPO policy")))
    trainer = SimpleNamespace(datamodule=_World(), loggers=[], global_step=0, is_global_zero=True)
    table = GenerationTable(num_shown=2, num_scored=2)
    table.on_train_start(trainer, module)
    tag["now"] = "after"
    table.on_train_end(trainer, module)
    before, after = table.results["before"]["figures"], table.results["after"]["figures"]
    assert (before["gold_win_rate"], before["exact_match"]) == (0.0, 1.0)  # right, but bare answers
    assert (after["gold_win_rate"], after["exact_match"]) == (0.5, 0.5)  # one preferred sentence, one wrong
    assert after["kl_mean"] == pytest.approx(0.3) and after["kl_max"] == 0.4
    assert after["reward_model_score"] == pytest.approx(0.2) and after["gold_win_rate/add"] == 1.0
    record = json.loads(json.dumps(written["evaluation.json"], default=str))
    assert record["scores"]["after"]["figures"]["gold_win_rate"] == 0.5
    assert record["rows"][0]["after"] == "7 is the sum of 3 and 4."


def test_nothing_evaluated_reports_nothing_even_to_a_wandb_logger() -> None:
    """A run whose data has no held-out prompts (a plain pairs file with no validation split) evaluates nothing:
    the report must not reach for generations that do not exist (it did, through W&B's table)."""
    from lightning.pytorch.loggers import WandbLogger

    calls = []
    logger = WandbLogger.__new__(WandbLogger)
    logger.log_table = lambda **kwargs: calls.append(kwargs)
    logger.log_metrics = lambda *args, **kwargs: calls.append(args)
    GenerationTable()._report(SimpleNamespace(loggers=[logger], global_step=0), "before", {})
    assert calls == []


def test_a_resumed_run_keeps_the_before_evaluation_of_its_start(capsys) -> None:
    """The "before" column of a resumed run is the policy the run started from (restored from the checkpoint in
    plain types), not the resumed policy: a resumed PPO run printed its step-120 policy as "SFT policy"."""
    from lit_ft.data.formats import Prompt

    table = GenerationTable()
    table.names = ("SFT policy", "PPO policy")
    table.results["before"] = {"rows": [(Prompt("What is 1 + 1?", [1, 2], "2"), "2")], "texts": ["2"],
                               "figures": {"exact_match": 1.0}, "scored": 1, "counts": "", "exact_match": 1.0}
    state = table.state_dict()
    assert all(isinstance(row, list) and all(isinstance(x, str) for x in row) for row in state["before"]["rows"])

    resumed = GenerationTable()
    resumed.load_state_dict(state)
    resumed.evaluate = lambda *args: pytest.fail("a resumed run must not evaluate its resumed policy as 'before'")
    resumed.on_train_start(SimpleNamespace(loggers=[], global_step=120), None)
    assert resumed.results["before"]["figures"] == {"exact_match": 1.0}
    assert resumed.results["before"]["rows"][0][0].text == "What is 1 + 1?" and resumed.names[0] == "SFT policy"
    assert "restored from the checkpoint" in capsys.readouterr().out
    assert GenerationTable().state_dict() == {}  # nothing measured yet: nothing to keep
