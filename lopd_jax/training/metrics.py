"""Run metrics: JSONL (the record of truth), TensorBoard event files, and PNG plots of the main curves."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

# The curves worth looking at, one panel each: (title, metric keys drawn in that panel).
PANELS = (
    ("loss", ("train/loss",)),
    ("teacher - student log-prob gap", ("opd/teacher_student_gap",)),
    ("KL to the behaviour policy", ("opd/kl_behavior_k1", "opd/kl_behavior_k3", "opd/kl_behavior_rev_k3")),
    ("importance weights", ("opd/iw_mean", "opd/iw_std", "opd/iw_max")),
    ("importance-weight ESS, clipped fraction", ("opd/iw_ess", "opd/clip_frac")),
    ("KL(student || pi_ref), fresh samples (nats / seq)", ("drift/kl_ref_k1", "drift/kl_ref_k3")),
    ("held-out accuracy", ("eval/pass@1", "eval/avg@k")),
    ("grad norm", ("train/grad_norm",)),
)


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard.

    ``header`` is stamped on every record (e.g. a warning that teacher consistency was overridden), so no line
    of the log can be read without it.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, header: Mapping | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.header = dict(header or {})
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **self.header, **{k: _to_float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (a resumed run appends; later records of a step win)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(metrics_path: str | os.PathLike, out_dir: str | os.PathLike, *, title: str = "") -> list[Path]:
    """Writes ``curves.png``: one panel per group of PANELS that has data. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [(name, keys) for name, keys in PANELS if any(k in r for r in records for k in keys)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
