"""The report of a multi-stage run (the demo): a printed table and PNG plots from the pipeline's stage records.

``lopd_jax.training.pipeline.run_pipeline`` returns one record per stage (``name``, ``group``, ``loop`` values,
``seconds``, ``cached``, ``result``: the stage's result JSON, e.g. a training run's ``eval.json``). The config's
optional ``report`` section says which stages are the methods being compared::

    report:
      title: Lightning OPD demo
      dir: runs/demo                       # where report.json and the plots go (default: the run directory)
      metric: eval/pass@1                  # the number read from each eval stage's result
      methods:
        - name: Lightning OPD
          eval: lightning_opd              # stage (foreach instances are aggregated: mean +- std)
          cost: [rollouts, teacher_logprobs, lightning_opd]   # stages whose wall-clock this method pays
          upstream: [sft_data, student_sft]  # stages of the model it starts from (added in "cumulative s")
          teacher: [teacher_logprobs]      # stages that run the teacher (their seconds are teacher compute)
          teacher_metric: time/teacher_s   # or/and: a metric summed over the eval stage's metrics.jsonl
          baseline: SFT student            # optional: print this method's gain over that one (paired, below)
          spread: train/grad_norm          # optional: its coefficient of variation over the logged steps

A method's wall-clock and teacher seconds are summed over its stages per foreach instance (stages without loop
values are shared by every instance), then averaged over instances. A method's cumulative seconds add its
``upstream`` stages: Lightning OPD starts from the SFT student, so the accuracy-vs-time plot places it at the SFT
run's cost plus its own, never left of SFT. Without a ``report`` section every stage
with a result is a method of its own.

Uncertainty. Each eval stage's ``eval.json`` keeps ``per_prompt`` (the fraction of each held-out prompt's samples
graded correct), so the table gives each pass@1 its evaluation's sampling error: the standard error of the mean over
the prompts (``eval s.e.``; over several instances, that of their mean). A method with a ``baseline`` gets a gain
line: per instance, the difference of the two methods' per-prompt scores on the same prompts (same loop values),
its mean and standard error (a paired comparison: both models see the same prompts, so the shared difficulty
cancels and the error is smaller than the two pass@1 errors combined); over several instances, the mean gain
+- its std across instances, and the evaluation's error of that mean.

``report(...)`` prints the tables, writes ``report.json`` and the plots ``accuracy.png``, ``stage_seconds.png`` and
``accuracy_vs_time.png`` into ``report.dir`` (default: the run directory; two configs sharing a run directory give
each its own).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lopd_jax.training.metrics import read_metrics
from lopd_jax.training.pipeline import resolve_run_dir

DEFAULT_METRIC = "eval/pass@1"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    eval: str
    cost: tuple[str, ...] = ()
    teacher: tuple[str, ...] = ()
    teacher_metric: str | None = None
    upstream: tuple[str, ...] = ()
    baseline: str | None = None  # another method's name: the gain over it is reported
    spread: str | None = None


@dataclasses.dataclass
class MethodResult:
    """One method aggregated over its instances (foreach values): lists are per instance."""

    name: str
    scores: list[float]
    seconds: list[float]
    teacher_seconds: list[float]
    cumulative_seconds: list[float] = dataclasses.field(default_factory=list)  # seconds + upstream stages
    loops: list[dict] = dataclasses.field(default_factory=list)  # each instance's loop values
    per_prompt: list[list[float] | None] = dataclasses.field(default_factory=list)  # eval.json's, per instance
    spreads: list[float] = dataclasses.field(default_factory=list)  # CV of the spec's ``spread`` metric per instance

    def stats(self, xs: list[float]) -> tuple[float, float]:
        a = np.asarray(xs, float)
        return (float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0) if len(a) else (math.nan, math.nan)


# ----------------------------------------------------------------------------------------------------------------
# Reading the config and the records
# ----------------------------------------------------------------------------------------------------------------


def run_dir_of(raw_config: dict, source: str) -> Path:
    """The run directory ``pipeline.run_pipeline`` uses for this config (``run_dir`` or runs/<config stem>)."""
    return Path(resolve_run_dir(raw_config, source))


def method_specs(raw_config: dict, records: list[dict]) -> list[MethodSpec]:
    """The ``report.methods`` of the config; ValueError naming the bad entry. Default: one per result stage."""
    section = raw_config.get("report") or {}
    if not isinstance(section, dict):
        raise ValueError("report: must be a mapping (title, metric, methods)")
    raw = section.get("methods")
    if raw is None:
        names = dict.fromkeys(_base(r) for r in records if "result" in r)
        return [MethodSpec(n, n, (n,)) for n in names]
    specs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not {"name", "eval"} <= m.keys():
            raise ValueError(f"report.methods[{i}]: needs 'name' and 'eval', got {m!r}")
        unknown = set(m) - {f.name for f in dataclasses.fields(MethodSpec)}
        if unknown:
            raise ValueError(f"report.methods[{i}]: unknown key(s) {sorted(unknown)}")
        specs.append(
            MethodSpec(
                str(m["name"]),
                str(m["eval"]),
                tuple(m.get("cost", ())),
                tuple(m.get("teacher", ())),
                m.get("teacher_metric"),
                tuple(m.get("upstream", ())),
                None if m.get("baseline") is None else str(m["baseline"]),
                m.get("spread"),
            )  # fmt: skip
        )
    names = {s.name for s in specs}
    for i, spec in enumerate(specs):
        if spec.baseline is not None and (spec.baseline not in names or spec.baseline == spec.name):
            raise ValueError(f"report.methods[{i}]: baseline {spec.baseline!r} is not another method's name")
    return specs


def _base(rec: dict) -> str:
    """The stage's name in the config (foreach instances carry their loop values as a name suffix)."""
    suffix = "".join(f"-{k}{v}" for k, v in rec.get("loop", {}).items())
    return rec["name"][: len(rec["name"]) - len(suffix)] if suffix else rec["name"]


def _matching(records: list[dict], base: str, loop: dict) -> list[dict]:
    """Records of stage ``base`` for the instance with loop values ``loop`` (or the shared, loop-less one)."""
    out = []
    for r in records:
        if _base(r) == base and all(loop.get(k) == v for k, v in r.get("loop", {}).items()):
            out.append(r)
    return out


def _seconds(records: list[dict], bases: tuple[str, ...], loop: dict) -> float:
    return sum(float(r.get("seconds", 0.0)) for b in bases for r in _matching(records, b, loop))


def _metric_sum(run_dir: Path, stage: str, key: str) -> float:
    """Sum of ``key`` over a training stage's metrics.jsonl (0 when absent)."""
    path = run_dir / stage / "metrics.jsonl"
    if not path.exists():
        return 0.0
    return float(sum(r.get(key, 0.0) for r in read_metrics(path) if isinstance(r.get(key), (int, float))))


def metric_cv(run_dir: Path, stage: str, key: str) -> float:
    """Coefficient of variation (std / mean, ddof 0) of ``key`` over the records of a training stage's
    metrics.jsonl: e.g. the spread of ``train/grad_norm`` from step to step. NaN with fewer than 2 records."""
    path = run_dir / stage / "metrics.jsonl"
    if not path.exists():
        return math.nan
    xs = np.asarray([r[key] for r in read_metrics(path) if isinstance(r.get(key), (int, float))], float)
    return float(xs.std() / xs.mean()) if len(xs) > 1 and xs.mean() != 0 else math.nan


def aggregate(records: list[dict], specs: list[MethodSpec], run_dir: Path, metric: str) -> list[MethodResult]:
    """Per method: the metric of each eval instance, and its wall-clock and teacher seconds."""
    results = []
    for spec in specs:
        res = MethodResult(spec.name, [], [], [])
        for ev in (r for r in records if _base(r) == spec.eval):
            loop = ev.get("loop", {})
            value = (ev.get("result") or {}).get(metric)
            if value is None:
                continue
            res.scores.append(float(value))
            res.loops.append(dict(loop))
            per_prompt = (ev.get("result") or {}).get("per_prompt")
            res.per_prompt.append([float(x) for x in per_prompt] if isinstance(per_prompt, list) else None)
            res.seconds.append(_seconds(records, spec.cost, loop))
            res.cumulative_seconds.append(res.seconds[-1] + _seconds(records, spec.upstream, loop))
            teacher = _seconds(records, spec.teacher, loop)
            if spec.teacher_metric:
                teacher += _metric_sum(run_dir, ev["name"], spec.teacher_metric)
            res.teacher_seconds.append(teacher)
            if spec.spread:
                res.spreads.append(metric_cv(run_dir, ev["name"], spec.spread))
        results.append(res)
    return results


def eval_se(per_prompt: list[float] | None) -> float:
    """The evaluation's sampling error of one pass@1: the standard error of the mean over its prompts (nan when
    the eval.json has no per-prompt scores)."""
    if not per_prompt or len(per_prompt) < 2:
        return math.nan
    x = np.asarray(per_prompt, float)
    return float(x.std(ddof=1) / math.sqrt(len(x)))


def mean_se(ses: list[float]) -> float:
    """The evaluation's error of a mean over independent instances: sqrt(sum se_i^2) / n."""
    a = np.asarray(ses, float)
    return float(math.sqrt(float((a**2).sum())) / len(a)) if len(a) else math.nan


@dataclasses.dataclass
class Gain:
    """A method's gain over its baseline, per instance (the baseline's instance with the same loop values)."""

    name: str  # "method - baseline"
    gains: list[float]
    ses: list[float]  # the evaluation's standard error of each gain
    paired: bool  # every instance compared prompt by prompt (else: pass@1 difference, independent errors)


def gains(results: list[MethodResult], specs: list[MethodSpec]) -> list[Gain]:
    """Per method with a ``baseline``: its gain in pass@1 per instance and that gain's standard error, paired over
    the held-out prompts when both eval.json files hold ``per_prompt`` for the same prompts."""
    by_name = {r.name: r for r in results}
    out = []
    for spec in specs:
        if spec.baseline is None:
            continue
        a, b = by_name[spec.name], by_name[spec.baseline]
        gain = Gain(f"{spec.name} - {spec.baseline}", [], [], True)
        for loop, score, pp in zip(a.loops, a.scores, a.per_prompt):
            match = [j for j, bl in enumerate(b.loops) if all(loop.get(k) == v for k, v in bl.items())]
            if not match:
                continue
            j = match[0]
            base_pp = b.per_prompt[j]
            if pp is not None and base_pp is not None and len(pp) == len(base_pp) > 1:
                d = np.asarray(pp, float) - np.asarray(base_pp, float)
                gain.gains.append(float(d.mean()))
                gain.ses.append(float(d.std(ddof=1) / math.sqrt(len(d))))
            else:
                gain.paired = False
                gain.gains.append(score - b.scores[j])
                gain.ses.append(math.hypot(eval_se(pp), eval_se(base_pp)))
        out.append(gain)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def _pm(mean: float, std: float, n: int, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" +- {std * scale:.{digits}f}" if n > 1 else "")


def stage_table(records: list[dict]) -> str:
    """One line per stage: name, ran / cached, wall-clock seconds (of the run that produced it)."""
    width = max(len(r["name"]) for r in records)
    lines = [f"{'stage':<{width}}  {'status':<6}  {'seconds':>8}"]
    for r in records:
        lines.append(f"{r['name']:<{width}}  {'cached' if r.get('cached') else 'ran':<6}  {r.get('seconds', 0):8.1f}")
    total = sum(float(r.get("seconds", 0.0)) for r in records)
    ran = sum(float(r.get("seconds", 0.0)) for r in records if not r.get("cached"))
    lines.append(f"{'all stages (cold run)':<{width}}  {'':<6}  {total:8.1f}")
    lines.append(f"{'this invocation':<{width}}  {'':<6}  {ran:8.1f}")
    return "\n".join(lines)


def _points(x: float, sign: bool = False) -> str:
    return "-" if math.isnan(x) else f"{100 * x:{'+' if sign else ''}.1f}"


def method_table(results: list[MethodResult], metric: str) -> str:
    """One line per method: metric (percent, mean +- std over instances), the evaluation's sampling error of it
    (eval s.e., points), n, wall-clock s (its own stages), cumulative s (plus the stages of the model it starts
    from), teacher s."""
    width = max([len(r.name) for r in results] + [6])
    head = f"{'method':<{width}}  {metric + ' (%)':>18}  {'eval s.e.':>9}  {'n':>2}  {'wall-clock s':>14}"
    spread = any(r.spreads for r in results)
    lines = [head + f"  {'cumulative s':>14}  {'teacher s':>12}" + (f"  {'grad spread (CV)':>16}" if spread else "")]
    for r in results:
        n = len(r.scores)
        acc = _pm(*r.stats(r.scores), n, 100.0)
        se = _points(mean_se([eval_se(pp) for pp in r.per_prompt]))
        secs = _pm(*r.stats(r.seconds), n, digits=0)
        cum = _pm(*r.stats(r.cumulative_seconds), n, digits=0)
        teacher = _pm(*r.stats(r.teacher_seconds), n, digits=0)
        line = f"{r.name:<{width}}  {acc:>18}  {se:>9}  {n:>2}  {secs:>14}  {cum:>14}  {teacher:>12}"
        if spread:
            line += f"  {_pm(*r.stats(r.spreads), len(r.spreads), digits=3) if r.spreads else '-':>16}"
        lines.append(line)
    return "\n".join(lines)


def gain_table(gain_list: list[Gain]) -> str:
    """One line per gain: points (mean +- std over instances), the evaluation's standard error of that mean,
    n, each instance's gain, and whether it was paired prompt by prompt."""
    width = max([len(g.name) for g in gain_list] + [4])
    lines = [f"{'gain':<{width}}  {'points':>14}  {'eval s.e.':>9}  {'n':>2}  {'per instance':<22}  paired"]
    for g in gain_list:
        n = len(g.gains)
        mean, std = (float(np.mean(g.gains)), float(np.std(g.gains, ddof=1)) if n > 1 else 0.0) if n else (math.nan, 0)
        pts = _points(mean, sign=True) + (f" +- {100 * std:.1f}" if n > 1 else "")
        each = " / ".join(_points(x, sign=True) for x in g.gains)
        se = _points(mean_se(g.ses))
        lines.append(f"{g.name:<{width}}  {pts:>14}  {se:>9}  {n:>2}  {each:<22}  {'yes' if g.paired else 'no'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: list[MethodResult], metric: str, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(results), 3.4))
    means = [r.stats(r.scores)[0] * 100 for r in results]
    stds = [r.stats(r.scores)[1] * 100 for r in results]
    ax.bar(range(len(results)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, r in enumerate(results):
        ax.scatter([i] * len(r.scores), [s * 100 for s in r.scores], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(results)), [r.name for r in results], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"held-out {metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stage_seconds(records: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.28 * len(records)))
    names = [r["name"] for r in records][::-1]
    secs = [float(r.get("seconds", 0.0)) for r in records][::-1]
    ax.barh(names, secs, color="tab:orange", alpha=0.85)
    ax.set_xlabel("wall-clock seconds (cold run)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_time(results: list[MethodResult], metric: str, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in results:
        (acc, acc_std), (sec, sec_std) = r.stats(r.scores), r.stats(r.cumulative_seconds)
        ax.errorbar(sec, acc * 100, xerr=sec_std, yerr=acc_std * 100, fmt="o", capsize=3, label=r.name)
    ax.set_xlabel("cumulative wall-clock (s): own stages + the model it starts from")
    ax.set_ylabel(f"held-out {metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def report(records: list[dict], raw_config: dict, source: str, *, plots: bool = True) -> str:
    """The printed report of a pipeline run; writes report.json and (``plots``) the PNGs into the run dir."""
    section = raw_config.get("report") or {}
    metric = section.get("metric", DEFAULT_METRIC)
    title = section.get("title", Path(source).stem)
    run_dir = run_dir_of(raw_config, source)
    out_dir = Path(section.get("dir") or run_dir)
    specs = method_specs(raw_config, records)
    results = aggregate(records, specs, run_dir, metric)
    gain_list = gains(results, specs)
    tables = [stage_table(records), method_table(results, metric)] + ([gain_table(gain_list)] if gain_list else [])
    text = f"\n{title}\n\n" + "\n\n".join(tables)
    summary = {
        "metric": metric,
        "methods": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "per_prompt"}
            | {"eval_se": [eval_se(pp) for pp in r.per_prompt]}
            for r in results
        ],
        "gains": [dataclasses.asdict(g) for g in gain_list],
        "stages": [{k: r.get(k) for k in ("name", "seconds", "cached")} for r in records],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1))
    written = ["report.json"]
    if plots:
        plot_stage_seconds(records, out_dir / "stage_seconds.png", f"{title}: wall-clock per stage")
        written.append("stage_seconds.png")
        if any(r.scores for r in results):
            plot_accuracy(results, metric, out_dir / "accuracy.png", f"{title}: held-out accuracy")
            plot_accuracy_vs_time(results, metric, out_dir / "accuracy_vs_time.png", f"{title}: accuracy vs time")
            written += ["accuracy.png", "accuracy_vs_time.png"]
    return text + f"\n\nreport and plots in {out_dir}/: " + ", ".join(written)


def load_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``report.json`` a previous ``report`` call wrote."""
    return json.loads((Path(run_dir) / "report.json").read_text())
