"""JSONL records, TensorBoard mirroring and plots of lopd_jax.training.metrics."""

import math

from lopd_jax.training.metrics import MetricsWriter, plot_metrics, read_metrics


def test_records_carry_the_header_and_resumed_steps_merge(tmp_path):
    w = MetricsWriter(tmp_path, header={"warning": "teacher inconsistency allowed"})
    w.write(0, {"train/loss": 2.0, "opd/iw_mean": 1.0})
    w.write(1, {"train/loss": 1.5})
    w.write(1, {"eval/pass@1": 0.25})  # e.g. eval logged after the train metrics of the same step
    w.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1]
    assert recs[1] == {"step": 1, "warning": "teacher inconsistency allowed", "train/loss": 1.5, "eval/pass@1": 0.25}
    assert all(r["warning"] == "teacher inconsistency allowed" for r in recs)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_plot_writes_a_png_with_the_panels_that_have_data(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(5):
        w.write(step, {"train/loss": 1.0 / (step + 1), "opd/teacher_student_gap": -0.5 + 0.1 * step, "x": math.nan})
    (png,) = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_of_a_run_without_known_curves_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(0, {"something/else": 1.0})
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots") == []
