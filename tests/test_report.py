"""lopd_jax.report: per-method aggregation over foreach instances, shared stages, teacher compute, tables, plots."""

import json

import numpy as np
import pytest

from lopd_jax import report


def _rec(name, seconds, loop=None, result=None, cached=False):
    loop = loop or {}
    suffix = "".join(f"-{k}{v}" for k, v in loop.items())
    rec = {"name": name + suffix, "group": None, "loop": loop, "seconds": seconds, "cached": cached}
    return rec | ({"result": result} if result is not None else {})


RECORDS = [
    _rec("sft", 10.0, result={"eval/pass@1": 0.40}),
    _rec("rollouts", 3.0),  # shared by every seed
    *[_rec("scoring", 2.0 + s, {"seed": s}) for s in range(3)],
    *[_rec("lopd", 5.0, {"seed": s}, {"eval/pass@1": a}) for s, a in enumerate([0.6, 0.7, 0.8])],
    *[_rec("opd", 20.0 + s, {"seed": s}, {"eval/pass@1": 0.7}, cached=True) for s in range(3)],
]
CONFIG = {
    "run_dir": "RUN",
    "report": {
        "methods": [
            {"name": "SFT", "eval": "sft", "cost": ["sft"]},
            {"name": "Lightning", "eval": "lopd", "cost": ["rollouts", "scoring", "lopd"], "teacher": ["scoring"]},
            {"name": "online", "eval": "opd", "cost": ["opd"], "teacher_metric": "time/teacher_s"},
        ]
    },
}


def test_methods_aggregate_their_instances_and_pay_shared_stages(tmp_path):
    (tmp_path / "opd-seed1").mkdir()
    lines = [{"step": 1, "time/teacher_s": 0.5}, {"step": 2, "time/teacher_s": 0.25}]
    (tmp_path / "opd-seed1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    specs = report.method_specs(CONFIG, RECORDS)
    sft, lightning, online = report.aggregate(RECORDS, specs, tmp_path, "eval/pass@1")
    assert sft.scores == [0.40] and sft.seconds == [10.0]
    assert lightning.scores == [0.6, 0.7, 0.8]
    assert lightning.seconds == [3 + 2 + 5, 3 + 3 + 5, 3 + 4 + 5]  # shared rollouts + this seed's scoring + training
    assert lightning.teacher_seconds == [2.0, 3.0, 4.0]
    mean, std = lightning.stats(lightning.scores)
    assert mean == pytest.approx(0.7) and std == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert online.teacher_seconds == [0.0, 0.75, 0.0]  # summed from the instance's own metrics.jsonl


def test_default_methods_are_the_stages_with_results():
    specs = report.method_specs({}, RECORDS)
    assert [(s.name, s.eval, s.cost) for s in specs] == [("sft", "sft", ("sft",)), ("lopd", "lopd", ("lopd",)),
                                                         ("opd", "opd", ("opd",))]  # fmt: skip


@pytest.mark.parametrize(
    ("section", "message"),
    [([1], "report: must be a mapping"), ({"methods": [{"name": "x"}]}, "needs 'name' and 'eval'"),
     ({"methods": [{"name": "x", "eval": "y", "bogus": 1}]}, "unknown key")],
)  # fmt: skip
def test_bad_report_sections_are_refused(section, message):
    with pytest.raises(ValueError, match=message):
        report.method_specs({"report": section}, RECORDS)


def test_tables_plots_and_report_json(tmp_path):
    config = CONFIG | {"run_dir": str(tmp_path)}
    text = report.report(RECORDS, config, "x.yaml")
    lines = text.splitlines()
    (lightning,) = [line for line in lines if line.startswith("Lightning")]
    assert "70.0 +- 10.0" in lightning and " 3 " in lightning
    (cold,) = [line for line in lines if line.startswith("all stages (cold run)")]
    assert float(cold.split()[-1]) == pytest.approx(sum(r["seconds"] for r in RECORDS))
    (now,) = [line for line in lines if line.startswith("this invocation")]
    assert float(now.split()[-1]) == pytest.approx(sum(r["seconds"] for r in RECORDS if not r["cached"]))
    saved = report.load_report(tmp_path)
    assert [m["name"] for m in saved["methods"]] == ["SFT", "Lightning", "online"]
    for png in ("accuracy.png", "stage_seconds.png", "accuracy_vs_time.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_run_dir_matches_the_pipeline_default():
    assert str(report.run_dir_of({}, "configs/demo.yaml")) == "runs/demo"
    assert str(report.run_dir_of({"run_dir": "/x"}, "configs/demo.yaml")) == "/x"


def test_cumulative_cost_adds_the_model_a_method_starts_from(tmp_path):
    """Lightning OPD starts from the SFT student: its cumulative cost includes the SFT stage, so the accuracy-vs-time
    plot can never place it left of SFT (it used to read as 'cheaper than SFT')."""
    config = {"run_dir": str(tmp_path), "report": {"methods": [dict(m) for m in CONFIG["report"]["methods"]]}}
    config["report"]["methods"][1]["upstream"] = ["sft"]
    sft, lightning, online = report.aggregate(RECORDS, report.method_specs(config, RECORDS), tmp_path, "eval/pass@1")
    assert sft.cumulative_seconds == sft.seconds == [10.0]
    assert lightning.cumulative_seconds == [s + 10.0 for s in lightning.seconds]
    assert online.cumulative_seconds == online.seconds  # no upstream given: its own stages only
    text = report.report(RECORDS, config, "x.yaml")
    (header,) = [line for line in text.splitlines() if line.startswith("method")]
    assert "cumulative s" in header
    (line,) = [line for line in text.splitlines() if line.startswith("Lightning")]
    assert "21 +- 1" in line  # mean of 20, 21, 22
    assert text.splitlines()[-1] == f"report and plots in {tmp_path}/: " + ", ".join(
        ["report.json", "stage_seconds.png", "accuracy.png", "accuracy_vs_time.png"]
    )


def test_spread_is_the_coefficient_of_variation_of_a_logged_metric(tmp_path):
    norms = {0: [1.0, 3.0], 1: [2.0, 2.0, 2.0], 2: [5.0]}  # CV 0.5, 0, NaN (a single record)
    for s, xs in norms.items():
        (tmp_path / f"lopd-seed{s}").mkdir()
        lines = [{"step": i + 1, "train/grad_norm": x} for i, x in enumerate(xs)]
        (tmp_path / f"lopd-seed{s}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = {"report": {"methods": [{"name": "L", "eval": "lopd", "spread": "train/grad_norm"}]}}
    (lightning,) = report.aggregate(RECORDS, report.method_specs(config, RECORDS), tmp_path, "eval/pass@1")
    assert lightning.spreads[:2] == [0.5, 0.0] and np.isnan(lightning.spreads[2])
    table = report.method_table([lightning], "eval/pass@1")
    assert "grad spread (CV)" in table.splitlines()[0]
