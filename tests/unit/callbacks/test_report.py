"""The run report from hand-written run files: how metrics.csv is read and grouped into charts, and the page's
sections, tables and inline images; ``lit-ft report`` on a folder, and on a folder that is not a run."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_ft.callbacks.report import RunReport
from lit_ft.cli import main
from lit_ft.loggers.csv_logger import CSVLogger
from lit_ft.tools.report import build_report, write_report
from lit_ft.tools.report_charts import before_after_scores, draw, group_charts, moving_mean, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# As Lightning's CSV writer leaves it: sorted columns, one row per log call, empty cells for metrics not logged.
SFT_CSV = """\
cost/elapsed_device_hours,epoch,eval/exact_match_after,eval/exact_match_before,lr,memory/peak_rss_gib,memory/rss_gib,\
step,throughput/mfu,throughput/supervised_tokens_per_s,throughput/tokens_per_s,train/loss,val/loss,val/perplexity
,,,0.05,,,,0,,,,,,
,0,,,0.001,,,0,,,,4.0,,
,,,,,1.5,1.4,0,,,,,,
,0,,,0.002,,,1,0.01,50,500,3.0,,
,0,,,0.002,,,2,0.02,60,600,2.5,,
,0,,,,,,2,,,,,2.8,16.44
,0,,,0.0015,,,3,0.02,55,550,2.0,,
,0,,,0.001,,,3,,,,1.9,,
,,,,,2.0,1.8,3,,,,,,
,0,,,,,,4,,,,,2.2,9.03
0.01,,0.6,,,,,4,,,,,,
"""

EVALUATION = {
    "tags": ["before", "after"],
    "scores": {"before": {"exact_match": 0.05, "scored": 20, "per_task": {"add": 0.0, "max": 0.1}},
               "after": {"exact_match": 0.6, "scored": 20, "per_task": {"add": 0.5, "max": 0.7}}},
    "rows": [{"prompt": "Below is an instruction.\n\n### Instruction:\nWhat is 3 + 4?\n\n### Response:\n",
              "reference": "7", "before": "3 + 4 is", "after": "7"},
             {"prompt": "### Instruction:\nWrite <b>bold</b>.\n\n### Response:\n", "reference": "",
              "before": "no", "after": "<b>bold</b>"}],
}
COST = {"devices": 1, "prices": {"g5.4xlarge": 0.6942}, "elapsed_device_hours": 0.01, "usd_g5.4xlarge": 0.006942,
        "projected_total_steps": 500.0, "projected_seconds_per_step": 0.5, "projected_device_hours": 0.07,
        "projected_epochs": 7.1, "dataset_tokens": 95000.0}
CONFIG = "seed_everything: 42\ntrainer:\n  max_steps: 4\nmodel:\n  class_path: lit_ft.stages.causal_lm.CausalLM\n" \
         "  init_args:\n    backbone:\n      pretrained: artifacts/base/tiny-mistral\n      lora:\n        r: 16\n" \
         "    note: a <tag> & more\ndata:\n  class_path: lit_ft.data.embedded.EmbeddedTasks\n"


@pytest.fixture()
def run(tmp_path) -> Path:
    run = tmp_path / "runs" / "sft"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(SFT_CSV)
    (run / "evaluation.json").write_text(json.dumps(EVALUATION))
    (run / "cost.json").write_text(json.dumps(COST))
    (run / "config.yaml").write_text(CONFIG)
    return run


def test_read_metrics_keeps_the_last_value_per_step_and_skips_empty_cells(run) -> None:
    series = read_metrics(run / "metrics.csv")
    assert series["train/loss"] == ([0.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.5, 1.9])  # step 3 logged twice: the last
    assert series["val/loss"] == ([2.0, 4.0], [2.8, 2.2])
    assert "step" not in series and "epoch" not in series
    assert before_after_scores(series) == {"exact_match": {"before": 0.05, "after": 0.6}}


def test_charts_put_training_and_validation_on_one_axis_and_group_units(run) -> None:
    sections = dict(group_charts(read_metrics(run / "metrics.csv")))
    assert list(sections) == ["Training and validation", "Throughput", "Memory"]  # no cost/*, no before/after
    training = {c.title: c for c in sections["Training and validation"]}
    assert list(training) == ["loss", "perplexity", "learning rate"]
    assert [(line.label, line.role) for line in training["loss"].lines] == [("train", "train"), ("val", "val")]
    derived, val = training["perplexity"].lines  # no logged training perplexity: exp(train/loss) beside val's
    assert derived.role == "derived" and derived.values == pytest.approx([math.exp(v) for v in (4.0, 3.0, 2.5, 1.9)])
    assert val.values == [16.44, 9.03]
    throughput = {c.title: [line.label for line in c.lines] for c in sections["Throughput"]}
    assert throughput == {"tokens/s": ["supervised_tokens_per_s", "tokens_per_s"], "mfu": ["mfu"]}
    assert [[line.label for line in c.lines] for c in sections["Memory"]] == [["peak_rss_gib", "rss_gib"]]


def test_rl_series_get_reward_kl_and_gold_against_proxy() -> None:
    series = {name: ([0.0, 1.0], [0.1, 0.2]) for name in (
        "train/score", "train/score_exact_match", "train/kl", "train/kl_coef", "train/policy_loss",
        "gold/score", "eval/exact_match_before", "time/rollout_s", "cost/usd_x")}
    sections = dict(group_charts(series))
    assert list(sections) == ["Reward and KL", "Gold against proxy", "Training and validation", "Other"]
    reward, kl, _coef = sections["Reward and KL"]
    assert [line.label for line in reward.lines] == ["score", "score_exact_match"] and kl.lines[0].label == "train"
    (gold,) = sections["Gold against proxy"]
    assert [line.label for line in gold.lines] == ["proxy (train/score)"]
    assert [line.label for line in gold.right] == ["gold (gold/score)"]  # its own axis: the scales differ
    assert [c.title for c in sections["Training and validation"]] == ["policy_loss"]
    assert [c.title for c in sections["Other"]] == ["time/rollout_s"]


def test_moving_mean_is_centred_and_cut_at_the_ends() -> None:
    assert moving_mean([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])


def test_draw_returns_a_png_for_long_single_point_and_log_scale_series() -> None:
    from lit_ft.tools.report_charts import Chart, Line

    steps = [float(s) for s in range(200)]
    chart = Chart("perplexity", [Line("train", steps, [1000.0 / (s + 1) for s in steps], "train"),
                                 Line("val", [100.0], [12.0], "val")])
    png = draw(chart)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_the_page_has_every_section_inline_images_and_escaped_text(run) -> None:
    path = write_report(run)
    page = path.read_text()
    assert path == run / "report.html"
    for section in ("curves", "before-after", "cost", "config"):
        assert f'<section id="{section}">' in page
    images = _images(page)
    assert len(images) == 6  # loss, perplexity, learning rate, tokens/s, mfu, memory
    assert all(img.startswith(PNG_MAGIC) and len(img) > 5000 for img in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing outside the file
    assert "<td>exact match</td><td>5.0%</td><td>60.0%</td><td class=change>+55.0 pts</td>" in page
    assert "exact match/add" in page
    assert "<td class='out ok'>7</td>" in page and "<td class='out bad'>3 + 4 is</td>" in page
    assert ">What is 3 + 4?</td>" in page  # the instruction, not the template around it
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert "a &lt;tag&gt; &amp; more" in page  # the config, escaped
    assert "$0.0069" in page and "500 steps x 0.500 s" in page and "7.10 epochs" in page
    assert "SFT · sft" in page


def test_missing_files_are_named_and_cost_falls_back_to_logged_values(run) -> None:
    for name in ("evaluation.json", "cost.json", "config.yaml"):
        (run / name).unlink()
    page = build_report(run)
    assert "no <code>config.yaml</code>" in page and "no <code>cost.json</code>" not in page
    assert "device-hours</th><td>0.0100" in page  # cost/elapsed_device_hours from metrics.csv
    assert "exact match" in page  # the before/after scores logged as eval/*_before|after
    (run / "metrics.csv").write_text("step\n")
    assert "Not recorded: no <code>metrics.csv</code>" in build_report(run)


def test_lit_ft_report_writes_the_page_and_rejects_a_folder_that_is_not_a_run(run, tmp_path, capsys) -> None:
    out = tmp_path / "elsewhere.html"
    main(["report", str(run), "--out", str(out)])
    assert out.is_file() and f"report: {out}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(empty)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0] and str(empty) in err[0]


class LoggingModel(BoringModel):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("boom")
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out


@pytest.mark.parametrize("fail_at", [None, 3])
def test_run_report_writes_the_page_when_fit_ends_and_when_it_fails(tmp_path, fail_at, capsys) -> None:
    run = tmp_path / "runs" / "x"
    trainer = L.Trainer(accelerator="cpu", max_steps=5, log_every_n_steps=1, logger=CSVLogger(save_dir=str(run)),
                        callbacks=[RunReport()], enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False)
    if fail_at is None:
        trainer.fit(LoggingModel())
    else:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(LoggingModel(fail_at))
    page = (run / "report.html").read_text()
    assert len(_images(page)) == 1  # train/loss up to the end or to the failure
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    steps = read_metrics(run / "metrics.csv")["train/loss"][0]
    assert steps == [float(s) for s in range(5 if fail_at is None else 3)]
