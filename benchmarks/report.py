"""Render a benchmark results document as JSON, a Markdown report and a PNG bar chart of the speed ratios, and
merge one section's outcome into the document on disk as soon as that section ends (so a timeout loses only the
unfinished section). Imports neither jax nor torch: the GPU driver (benchmarks.gpu_suite) records skips with it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lopd_jax.atomic import write_atomic


def _ms(s: dict[str, float]) -> str:
    return f"{1e3 * s['median']:.1f} [{1e3 * s['min']:.1f}-{1e3 * s['max']:.1f}]"


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def _machine(doc: dict) -> list[str]:
    if "machine" not in doc:
        return ["- machine: not recorded (no section has run yet)"]
    m = doc["machine"]
    v = m["versions"]
    lines = [
        f"- date: {m['date']}; backend {m['backend']}, device {m['device']['kind']} x{m['device']['count']}",
        f"- host CPU: {m['host']['cpu']}, {m['host']['cores']} cores"
        + (f"; load average at the end {m['load_average_1_5_15'][0]:.1f}" if m.get("load_average_1_5_15") else ""),
        f"- versions: jax {v['jax']}, jaxlib {v['jaxlib']}, torch {v['torch']}, transformers {v['transformers']}"
        + (f", vllm {v['vllm']}" if v.get("vllm") else ""),
        f"- peak FLOP/s for MFU: {doc['peak_flops'] / 1e12:.3g} TFLOP/s ({doc['peak_flops_source']})",
    ]
    if doc.get("peak_bandwidth"):
        lines.append(f"- peak memory bandwidth (data sheet): {doc['peak_bandwidth'] / 1e12:.3g} TB/s")
    if doc.get("budget_s"):
        lines.append(f"- time budget: {doc['budget_s']:.0f} s for all sections, compiles included")
    if doc.get("policy"):
        lines.append(f"- train-step dtype policy (every card): {doc['policy']}")
    if m.get("xla_flags"):
        lines.append(f"- XLA_FLAGS: `{m['xla_flags']}`")
    if doc.get("note"):
        lines.append(f"- note: {doc['note']}")
    return lines


def _train_table(rows: list[dict]) -> list[str]:
    out = [
        "| model | params | dtype / remat / attention | B x T | step ms, median [min-max] | tokens/s | "
        "GFLOP/token | TFLOP/s | MFU | peak memory | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['name']} | | | | skipped: {r['skipped']} | | | | | | |")
            continue
        m = r["model"]
        out.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {m['dtype']}/{m['param_dtype']} params, "
            f"{m['remat']}, {m['attention']} | {r['batch_size']} x {r['seq_len']} | {_ms(r['step_s'])} | "
            f"{r['tokens_per_s']:,.0f} | {r['flops_per_token'] / 1e9:.3f} | {r['model_tflops_per_s']:.3g} | "
            f"{100 * r['mfu']:.1f}% | {_gib(r['peak_bytes'])} ({r['peak_bytes_source'].split()[0]}) | "
            f"{r['compile_s']:.1f} |"
        )
    return out


def ratios(doc: dict) -> list[tuple[str, dict, float | None]]:
    """(label, ratio dict with median/low/high, goal) for every side-by-side comparison present."""
    res, goals, out = doc.get("results", {}), doc.get("goals", {}), []
    if "vs_torch" in res:
        r = res["vs_torch"]
        out.append((f"OPD step: JAX jit vs torch eager{_forms(r)}", r["speedup"], goals.get("vs_torch")))
    if "vs_torch_35m" in res:
        r = res["vs_torch_35m"]
        label = f"OPD step, {r['params'] / 1e6:.0f}M: JAX jit vs torch eager{_forms(r)}"
        out.append((label, r["speedup"], goals.get("vs_torch_35m")))
    for row in res.get("sampling", {}).get("rows", []):
        goal = goals.get("sampling") if row["batch"] == 32 else None
        label = f"sampling, batch {row['batch']}: JAX vs transformers.generate{_forms(res['sampling'])}"
        out.append((label, row["speedup"], goal))
        for forms, alt in row.get("other_forms", {}).items():
            label = f"sampling, batch {row['batch']}: JAX vs transformers.generate ({forms})"
            out.append((label, alt["speedup"], None))
    if "precompute" in res and "speedup" in res["precompute"]:
        out.append(("teacher scoring: JAX vs transformers", res["precompute"]["speedup"], goals.get("precompute")))
        if "speedup_vs_vllm" in res["precompute"]:
            out.append(("teacher scoring: JAX vs vLLM", res["precompute"]["speedup_vs_vllm"], None))
    if "lightning_vs_opd" in res:
        r = res["lightning_vs_opd"]
        out.append(("step: Lightning vs standard OPD", r["step_speedup"], goals.get("lightning_vs_opd")))
        total = {"median": r["total_speedup"], "low": r["total_speedup"], "high": r["total_speedup"]}
        out.append((f"total to {r['steps']} steps incl. precompute", total, None))
    return out


def _forms(r: dict) -> str:
    """The row's model forms (older results name none: einsum everywhere)."""
    return f" ({r['forms']})" if "forms" in r else ""


def _ratio_table(doc: dict) -> list[str]:
    out = ["| comparison | ratio, median [low-high] | goal | met |", "|---|---|---|---|"]
    for label, r, goal in ratios(doc):
        met = "" if goal is None else ("yes" if r["median"] >= goal else "**no**")
        out.append(f"| {label} | {r['median']:.2f}x [{r['low']:.2f}-{r['high']:.2f}] | {goal or ''} | {met} |")
    return out


def _details(res: dict) -> list[str]:
    out = [_vs_torch_line(res[k]) for k in ("vs_torch", "vs_torch_35m") if k in res]
    if "sampling" in res:
        r = res["sampling"]
        rows = "; ".join(
            f"batch {x['batch']}: JAX {x['jax_tokens_per_s']:,.0f} vs {x['torch_tokens_per_s']:,.0f} tokens/s "
            f"({x['torch_threads']} thread(s)), tokens identical: {'yes' if x['identical_tokens'] else 'NO'}"
            + "".join(
                f" (JAX {k}: {a['jax_tokens_per_s']:,.0f} tokens/s, "
                f"identical: {'yes' if a['identical_tokens'] else 'NO'})"
                for k, a in x.get("other_forms", {}).items()
            )
            for x in r["rows"]
        )
        out.append(
            f"- Greedy sampling{_forms(r)}, {r['params'] / 1e6:.2f}M params, {r['prompt_len']}-token prompts, "
            f"{r['max_new_tokens']} new tokens, same weights: {rows}."
        )
    out += _scoring_lines(res)
    return out


def _vs_torch_line(r: dict) -> str:
    a = r["agreement"]
    f64 = a.get("torch_grad_norm_f64")  # clip_grad_norm_'s CPU fp32 norm reads low on large tensors
    return (
        f"- OPD step{_forms(r)}, {r['params'] / 1e6:.2f}M params, B x T = {r['batch_size']} x {r['seq_len']}, "
        f"{r['rounds']} alternating rounds of {r['steps_per_round']} steps: JAX {_ms(r['jax_step_s'])} ms, "
        f"torch ({r['torch_threads']} thread(s), {r['torch_attention']}) {_ms(r['torch_step_s'])} ms. "
        f"First step agrees: loss {a['jax_loss']:.6f} vs {a['torch_loss']:.6f}, grad norm "
        f"{a['jax_grad_norm']:.6f} vs {a['torch_grad_norm']:.6f}"
        + (f" (torch's gradients summed in float64: {f64:.6f})." if f64 is not None else ".")
    )


def _scoring_lines(res: dict) -> list[str]:
    """Teacher scoring and Lightning-vs-standard detail lines."""
    out = []
    if "precompute" in res:
        r = res["precompute"]
        torch_side = (
            f"transformers ({r['torch_threads']} thread(s)) {r['torch_tokens_per_s']:,.0f} tokens/s"
            if "torch_tokens_per_s" in r
            else f"transformers skipped: {r.get('torch', {}).get('skipped', '?')}"
        )
        diff = r.get("max_abs_logprob_diff")
        out.append(
            f"- Teacher scoring, {r['params'] / 1e6:.2f}M params ({r['dtype']}), {r['sequences']} sequences / "
            f"{r['tokens']:,} tokens in {r['batches']} batches: JAX {r['jax_tokens_per_s']:,.0f} tokens/s, "
            f"{torch_side}; first JAX pass (compiles) {r['jax_first_pass_s']:.1f} s"
            + (f"; max |log-prob difference| {diff:.2e}." if diff is not None else ".")
        )
        if "vllm" in r:
            v = r["vllm"]
            speed = v.get("skipped") or f"{v['tokens_per_s']:,.0f} tokens/s"
            out.append(f"- vLLM: {speed}")
    if "lightning_vs_opd" in res:
        r = res["lightning_vs_opd"]
        p = r["standard_parts_median_s"]
        out.append(
            f"- Lightning vs standard OPD, student {r['student_params'] / 1e6:.2f}M / teacher "
            f"{r['teacher_params'] / 1e6:.2f}M params, B = {r['batch_size']} prompts, {r['max_new_tokens']} new "
            f"tokens, T = {r['seq_len']}, {r['steps']} steps x {r['rounds']} rounds: Lightning step "
            f"{_ms(r['lightning_step_s'])} ms; standard step {_ms(r['standard_step_s'])} ms = sampling "
            f"{1e3 * p['sample_s']:.1f} + teacher {1e3 * p['teacher_s']:.1f} + update {1e3 * p['update_s']:.1f} ms "
            f"(medians). One-off precompute {r['precompute_s']:.2f} s warm ({r['precompute_first_s']:.1f} s cold, "
            f"compiles included). Totals to {r['steps']} steps: Lightning {r['lightning_total_s']:.2f} s, "
            f"standard {r['standard_total_s']:.2f} s."
        )
    return out


def _moe_lines(c: dict) -> list[str]:
    """One line per implementation of benchmarks.moe_check: time, TFLOP/s, temp memory, agreement, or its error."""
    if "impls" not in c:
        return [f"- moe_check failed: {c.get('error', '?')[:300]}"]
    rows = {**c["impls"], "ragged_dot + cuDNN fusion flag": c.get("ragged_dot_fusion", {})}
    rows |= {f"triton kernels alone, {k}": v for k, v in c.get("triton_tiles", {}).items()}
    shape = f"{c['assignments']} assignments, D {c['hidden']}, E {c['experts']}, F {c['moe_intermediate']}"
    out = [f"- jax {c.get('jax')}, {c.get('device')}: {shape}"]
    for name, r in rows.items():
        if "wall_s" not in r:
            out.append(f"- {name}: failed: `{r.get('error', '?').splitlines()[0][:200]}`")
            continue
        temp = f", XLA temp {r['xla_temp_bytes'] / 1e9:.2f} GB" if r.get("xla_temp_bytes") is not None else ""
        agree = "" if "ok" not in r else (" agrees" if r["ok"] else f" DISAGREES {r['max_rel_diff']}")
        out.append(f"- {name}: {1e3 * r['wall_s']['median']:.2f} ms, {r['tflops_per_s']:.1f} TFLOP/s{temp};{agree}")
    return out


def markdown(doc: dict) -> str:
    title = f"# Benchmarks: {doc['suite']} suite" + (" (--tiny shapes)" if doc["tiny"] else "")
    lines = [title, "", *_machine(doc), ""]
    res = doc.get("results", {})
    if doc.get("attention_check"):
        c = doc["attention_check"]
        verdict = (
            f"agree (max |logit diff| {c['max_abs_logit_diff']:.3g} of {c['max_abs_logit']:.3g}, max |grad diff| "
            f"{c['max_abs_grad_diff']:.3g} of {c['max_abs_grad']:.3g})"
            if "max_abs_logit_diff" in c
            else f"cuDNN path unavailable: {c.get('error', '?')[:300]}"
        )
        lines += ["## Fused cuDNN attention with packed segments vs XLA", "", f"- {verdict}", ""]
    if doc.get("moe_check"):
        title = "## MoE grouped matmuls (one 30B-A3B layer, forward + backward)"
        lines += [title, "", *_moe_lines(doc["moe_check"]), ""]
    if "train_step" in res:
        lines += ["## Training step (jitted OPD update)", "", *_train_table(res["train_step"]), ""]
    if ratios(doc):
        lines += ["## Side by side", "", *_ratio_table(doc), "", *_details(res), ""]
    elif "precompute" in res:
        lines += ["## Teacher scoring", "", *_details({"precompute": res["precompute"]}), ""]
    if doc.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in doc["skipped"].items()] + [""]
    if doc.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: `{v.splitlines()[0][:300]}`" for k, v in doc["errors"].items()] + [""]
    if doc.get("section_seconds"):
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in doc["section_seconds"].items())
        lines += ["## Wall-clock per section", "", f"- {secs}", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path | None:
    """Bar chart of the side-by-side ratios (median, whiskers low-high) with the goals as ticks."""
    rows = ratios(doc)
    if not rows or importlib.util.find_spec("matplotlib") is None:  # the GPU image may lack it: no PNG then
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.7 * len(rows) + 1.2))
    med = [r["median"] for _, r, _ in rows]
    err = [[r["median"] - r["low"] for _, r, _ in rows], [r["high"] - r["median"] for _, r, _ in rows]]
    y = list(range(len(rows)))
    ax.barh(y, med, xerr=err, color="#4c72b0", capsize=4)
    for i, (_, _, goal) in enumerate(rows):
        if goal:
            ax.plot([goal, goal], [i - 0.4, i + 0.4], color="#c44e52", lw=2, label="goal" if i == 0 else None)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yticks(y, [label for label, _, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (x), median of alternating runs; whiskers: slowest/fastest pairing")
    ax.set_title(f"lopd_jax {doc['suite']} suite, {doc['machine']['device']['kind']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(doc: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem``.json, ``stem``.md and ``stem``_ratios.png under ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_atomic(paths[0], json.dumps(doc, indent=1, default=float) + "\n")
    write_atomic(paths[1], markdown(doc))
    png = plot(doc, out_dir / f"{stem}_ratios.png")
    return paths + ([png] if png else [])


def load_run(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The document of run ``header["run_id"]`` at ``path``, or a fresh one from ``header`` (another run's file,
    or none yet). Every section process of one gpu.sh run adds to the same document."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None
    if not doc or doc.get("run_id") != header.get("run_id"):
        doc = {"results": {}, "errors": {}, "skipped": {}, "section_seconds": {}}
    for key, value in header.items():  # the driver's header lacks what only the section processes know
        if doc.get(key) is None:
            doc[key] = value
    return doc


def merge(doc: dict[str, Any], section: str, result: Any = None, error=None, skipped=None, seconds=None) -> None:
    """Record one section's outcome in ``doc``. A section ``train_step/<model>`` is one row of the train table
    (replacing an earlier row of the same name), any other section its own entry under ``results``."""
    for key in ("results", "errors", "skipped", "section_seconds"):
        doc.setdefault(key, {})
    if result is not None:
        if section.startswith("train_step/"):
            rows = [r for r in doc["results"].get("train_step", []) if r["name"] != result["name"]]
            doc["results"]["train_step"] = rows + [result]
        else:
            doc["results"][section] = result
    if error is not None:
        doc["errors"][section] = error
    if skipped is not None:
        doc["skipped"][section] = skipped
    if seconds is not None:
        doc["section_seconds"][section] = seconds
