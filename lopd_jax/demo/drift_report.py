"""The drift trade-off of a pipeline run (configs/demo_drift.yaml): accuracy against the teacher's cost, drift curves.

``python -m lopd_jax.demo.drift_report --run-dir runs/demo --out DIR --method lightning_long --method opd_long ...``
reads, for every seed instance ``<method>-seed<s>`` of each method, its ``eval.json``, its ``metrics.jsonl`` and
(refreshed runs) ``refresh/generations.json``, and writes ``drift_report.json``, ``drift_report.txt``,
``accuracy_vs_teacher_tokens.png`` and ``drift_curves.png`` to DIR.

The teacher's cost, counted the same way for every method:

* tokens: response tokens the teacher scored. Offline: every response token of generation 0's store (the
  ``--gen0-teacher`` stage of the seed) plus those of each refreshed generation; online OPD: the response tokens of
  every step's batch (``data/tokens`` summed over the log, which needs ``train.log_every: 1``).
* seconds: offline, the wall-clock of each scoring stage (model load and compile included); online, the teacher's
  forward inside the training loop (``time/teacher_s``; the teacher is loaded once, before the first step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from lopd_jax.store import RolloutStore
from lopd_jax.training.metrics import read_metrics

CURVE_KEYS = ("drift/kl_ref_k3", "opd/kl_behavior_k3", "opd/iw_ess", "opd/clip_frac")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _response_tokens(store_path: Path) -> int:
    store = RolloutStore.open(str(store_path))
    return int((store.lengths - store.prompt_lengths).sum())


def refreshed_generations(rdir: Path) -> list[dict]:
    """Generations g >= 1 whose scoring stage has completed, read from the stages themselves (so a run still
    going counts every refresh it has paid for): first step (the previous stop), teacher tokens and seconds."""
    gens = []
    for stop in sorted(rdir.glob("stop-gen*.json"), key=lambda p: int(p.stem.removeprefix("stop-gen"))):
        g = int(stop.stem.removeprefix("stop-gen")) + 1
        stage = _json(rdir / f"gen{g}_teacher" / "stage.json")
        if stage is None:
            continue
        tokens = _response_tokens(rdir / f"gen{g}_teacher" / "store")
        gens.append({"generation": g, "first_step": _json(stop)["step"], "teacher_tokens": tokens,
                     "teacher_s": stage["seconds"]})  # fmt: skip
    return gens


def seed_result(run_dir: Path, method: str, seed: str, gen0_teacher: str) -> dict | None:
    """One seed instance's accuracy, teacher cost and curves; None while it has not finished."""
    d = run_dir / f"{method}-seed{seed}"
    ev = _json(d / "eval.json")  # None while the run has not finished: its evaluations so far are reported
    if not (d / "metrics.jsonl").exists():
        return None
    records = read_metrics(d / "metrics.jsonl")
    out = {"method": method, "seed": int(seed), "pass@1": None if ev is None else ev.get("eval/pass@1")}
    out["steps"] = records[-1]["step"]
    out["evals"] = [(r["step"], r["eval/pass@1"]) for r in records if "eval/pass@1" in r]
    out["cost_at"] = {}  # eval step -> (teacher tokens, teacher s) spent by then
    if records[0].get("mode") == "opd":
        for step, _ in out["evals"]:
            upto = [r for r in records if r["step"] <= step]
            out["cost_at"][step] = (sum(r.get("data/tokens", 0.0) for r in upto),
                                    sum(r.get("time/teacher_s", 0.0) for r in upto))  # fmt: skip
        out["refreshes"] = None
    else:
        g0 = run_dir / f"{gen0_teacher}-seed{seed}"
        tokens0 = float(_response_tokens(g0 / "store"))
        seconds0 = float((_json(g0 / "stage.json") or {}).get("seconds", math.nan))
        gens = refreshed_generations(d / "refresh")
        out["refreshes"] = len(gens)
        out["refresh_steps"] = [g["first_step"] for g in gens]
        for step, _ in out["evals"]:
            done = [g for g in gens if g["first_step"] < step]
            out["cost_at"][step] = (tokens0 + sum(g["teacher_tokens"] for g in done),
                                    seconds0 + sum(g["teacher_s"] for g in done))  # fmt: skip
    last = out["evals"][-1][0] if out["evals"] else None
    out["teacher_tokens"], out["teacher_s"] = out["cost_at"].get(last, (math.nan, math.nan))
    out["curves"] = {
        k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), float) and math.isfinite(r[k])]
        for k in CURVE_KEYS
    }
    return out


def _seeds(run_dir: Path, method: str) -> list[str]:
    return sorted(p.name.rsplit("-seed", 1)[1] for p in run_dir.glob(f"{method}-seed*") if p.is_dir())


def common_step(results: list[dict]) -> int | None:
    """The last evaluation step every seed of every method has reached (runs that are still going included)."""
    steps = [r["evals"][-1][0] for r in results if r["evals"]]
    return min(steps) if steps and all(r["evals"] for r in results) else None


def summarize(results: list[dict], methods: list[str], step: int) -> list[dict]:
    """Per method, at evaluation step ``step``: pass@1 (mean, std, per seed), teacher cost spent by then,
    refreshes, and KL(student || pi_ref) at that step."""
    rows = []
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            rows.append({"method": m, "n": 0})
            continue
        acc = np.array([dict(r["evals"])[step] for r in rs], float) * 100
        kl = [dict(r["curves"]["drift/kl_ref_k3"]).get(step) for r in rs]
        kl = [x for x in kl if x is not None]
        rows.append({
            "method": m,
            "n": len(rs),
            "step": step,
            "pass@1": float(acc.mean()),
            "pass@1_std": float(acc.std()),
            "per_seed": [round(float(a), 1) for a in acc],
            "teacher_tokens": float(np.mean([r["cost_at"][step][0] for r in rs])),
            "teacher_s": float(np.mean([r["cost_at"][step][1] for r in rs])),
            "refreshes": [None if r["refreshes"] is None else sum(x < step for x in r["refresh_steps"]) for r in rs],
            "kl_ref_k3": float(np.mean(kl)) if kl else None,
            "finished": [r["pass@1"] is not None for r in rs],
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    step = next((r["step"] for r in rows if r["n"]), None)
    head = f"{'method':<16} {'n':>2} {'pass@1 %':>13} {'per seed':>18} {'teacher tok':>12} {'teacher s':>10} "
    head += f"{'refreshes':>10} {'KL(s||ref) k3':>14}"
    lines = [f"at optimizer step {step} (evaluated by every seed of every method)", head]
    for r in rows:
        if not r["n"]:
            lines.append(f"{r['method']:<16}  0   (no seed has an evaluation yet)")
            continue
        kl = "-" if r["kl_ref_k3"] is None else f"{r['kl_ref_k3']:.3f}"
        refreshes = "-" if r["refreshes"][0] is None else "/".join(map(str, r["refreshes"]))
        lines.append(
            f"{r['method']:<16} {r['n']:>2} {r['pass@1']:>6.1f} +- {r['pass@1_std']:<4.1f} "
            f"{'/'.join(map(str, r['per_seed'])):>18} {r['teacher_tokens']:>12.0f} {r['teacher_s']:>10.1f} "
            f"{refreshes:>10} {kl:>14}"
        )
    return "\n".join(lines)


def plot(results: list[dict], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, r in enumerate(x for x in rows if x["n"]):
        pts = [
            (s["cost_at"][r["step"]][0], 100 * dict(s["evals"])[r["step"]])
            for s in results
            if s["method"] == r["method"]
        ]
        ax.scatter(*zip(*pts), color=f"C{i}", alpha=0.35, s=14)
        ax.errorbar(r["teacher_tokens"], r["pass@1"], yerr=r["pass@1_std"], fmt="o", color=f"C{i}", label=r["method"])
    ax.set_xscale("log")
    lo, hi = ax.get_ylim()  # at least 10 points tall: a 300-prompt pass@1 alone varies by +-2.3 points
    mid = (lo + hi) / 2
    ax.set_ylim(min(lo, mid - 5), max(hi, mid + 5))
    ax.set_xlabel("teacher-scored tokens")
    ax.set_ylabel(f"held-out pass@1 (%) at step {rows[0].get('step')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_teacher_tokens.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4), squeeze=False)
    names = [r["method"] for r in rows if r["n"]]
    first_seed = {m: min(x["seed"] for x in results if x["method"] == m) for m in names}
    for ax, key in zip(axes[0], CURVE_KEYS):
        for s in results:
            if s["curves"][key]:
                color = f"C{names.index(s['method'])}"
                label = s["method"] if s["seed"] == first_seed[s["method"]] else None
                ax.plot(*zip(*s["curves"][key]), color=color, alpha=0.7, lw=1, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "drift_curves.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lopd_jax.demo.drift_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", action="append", required=True, help="a stage name (its foreach seeds are read)")
    p.add_argument("--gen0-teacher", required=True, help="the stage that scored generation 0 (per seed)")
    args = p.parse_args(argv)
    run_dir, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for m in args.method:
        for seed in _seeds(run_dir, m):
            r = seed_result(run_dir, m, seed, args.gen0_teacher)
            if r is not None:
                results.append(r)
    step = common_step(results)
    if step is None:
        print("no evaluation yet in any run", flush=True)
        return 0
    rows = summarize(results, args.method, step)
    text = table(rows)
    print(text, flush=True)
    (out / "drift_report.txt").write_text(text + "\n")
    (out / "drift_report.json").write_text(json.dumps({"methods": rows, "seeds": results}, indent=1))
    if results:
        plot(results, rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
