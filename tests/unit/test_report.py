"""lopd_jax.demo.report: per-method aggregation over foreach instances, shared stages, teacher compute, tables,
plots."""

import json

import numpy as np
import pytest

from lopd_jax.demo import report


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
    plot can never place it left of SFT (it would read as 'cheaper than SFT')."""
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


def test_eval_standard_errors_and_the_paired_gain(tmp_path):
    """eval s.e. = std(per prompt, ddof=1) / sqrt(n); the gain over a baseline is paired prompt by prompt within
    the same seed, and its error is that of the per-prompt differences (here far below the unpaired one)."""
    rng = np.random.default_rng(0)
    base = [rng.random(400) < 0.6 for _ in range(2)]
    # The method solves every prompt its seed's baseline solved, and 40 more: a gain of exactly 10 points.
    better = []
    for b in base:
        m = b.copy()
        m[np.flatnonzero(~b)[:40]] = True
        better.append(m)
    records = [
        *[_rec("sft", 1.0, {"seed": s}, {"eval/pass@1": b.mean(), "per_prompt": b.astype(float).tolist()})
          for s, b in enumerate(base)],
        *[_rec("lopd", 1.0, {"seed": s}, {"eval/pass@1": m.mean(), "per_prompt": m.astype(float).tolist()})
          for s, m in enumerate(better)],
        _rec("teacher", 1.0, result={"eval/pass@1": 0.9}),  # an older eval.json without per_prompt
    ]  # fmt: skip
    config = {
        "run_dir": str(tmp_path),
        "report": {
            "methods": [
                {"name": "SFT", "eval": "sft"},
                {"name": "Lightning", "eval": "lopd", "baseline": "SFT"},
                {"name": "teacher", "eval": "teacher"},
            ]
        },
    }
    specs = report.method_specs(config, records)
    sft, lightning, teacher = report.aggregate(records, specs, tmp_path, "eval/pass@1")
    p = base[0].mean()
    assert report.eval_se(sft.per_prompt[0]) == pytest.approx(np.sqrt(p * (1 - p) / 399))
    assert teacher.per_prompt == [None] and np.isnan(report.eval_se(None))
    (gain,) = report.gains([sft, lightning, teacher], specs)
    assert gain.name == "Lightning - SFT" and gain.paired
    assert gain.gains == [pytest.approx(0.1), pytest.approx(0.1)]
    d = np.r_[np.ones(40), np.zeros(360)]  # the per-prompt differences of each seed
    assert gain.ses == [pytest.approx(d.std(ddof=1) / 20)] * 2
    assert gain.ses[0] < np.hypot(report.eval_se(sft.per_prompt[0]), report.eval_se(lightning.per_prompt[0]))
    text = report.report(records, config, "x.yaml", plots=False)
    (line,) = [line for line in text.splitlines() if line.startswith("Lightning - SFT")]
    assert line.split()[3:6] == ["+10.0", "+-", "0.0"] and "+10.0 / +10.0" in line and line.endswith("yes")
    assert f"{100 * report.mean_se(gain.ses):.1f}" in line.split()
    (row,) = [line for line in text.splitlines() if line.startswith("SFT")]
    assert f"{100 * report.mean_se([report.eval_se(pp) for pp in sft.per_prompt]):.1f}" == row.split()[4]
    saved = report.load_report(tmp_path)
    assert saved["gains"][0]["gains"] == pytest.approx([0.1, 0.1])
    assert "per_prompt" not in saved["methods"][0] and len(saved["methods"][0]["eval_se"]) == 2


def test_a_gain_falls_back_to_independent_errors_without_per_prompt_scores(tmp_path):
    records = [_rec("a", 1.0, result={"eval/pass@1": 0.5}), _rec("b", 1.0, result={"eval/pass@1": 0.75})]
    config = {"report": {"methods": [{"name": "A", "eval": "a"}, {"name": "B", "eval": "b", "baseline": "A"}]}}
    specs = report.method_specs(config, records)
    (gain,) = report.gains(report.aggregate(records, specs, tmp_path, "eval/pass@1"), specs)
    assert gain.gains == [0.25] and not gain.paired and np.isnan(gain.ses[0])


def test_a_baseline_must_name_another_method():
    bad = {"report": {"methods": [{"name": "A", "eval": "a", "baseline": "nope"}]}}
    with pytest.raises(ValueError, match=r"report.methods\[0\]: baseline 'nope'"):
        report.method_specs(bad, RECORDS)


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
