"""A look inside a RolloutStore: ``python -m precompute.inspect STORE [-n 3] [--out DIR]``.

Prints ``-n`` decoded samples (or ``--samples i,j,...``): the prompt, the response, and per response token its
behaviour and teacher log-probs, the advantage ``teacher - behaviour`` (``precompute.store_view``) and the teacher's
top alternative when the store has top-k columns. Writes into ``--out`` (default: ``STORE.inspect`` beside a local
store) a self-contained ``inspect.html`` that colours each response token of those samples by its advantage (red:
the teacher finds the token less likely than the student did; green: more likely; grey: not scored), a tooltip
with the numbers and the teacher's top-k alternatives, plus ``advantages.png`` (the distribution of per-token
advantages) and ``lengths.png`` (response lengths), both over the store (``--stats-samples`` evenly spaced
samples, all by default up to 20000) and embedded in the page too.

Works on a dataset of shards. A store under writing is read as of its last commit, and the output says so, naming
the writer.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from typing import Any

import numpy as np

from lopd_jax.atomic import write_atomic
from precompute import common, store_view
from precompute.common import PrecomputeError

CLIP = 10.0  # nats: advantages beyond +-CLIP fall into the histogram's edge bins
BINS = np.linspace(-CLIP, CLIP, 201)
FILES = ("inspect.html", "advantages.png", "lengths.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m precompute.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="RolloutStore path, kvstore URL, or dataset directory of shard stores")
    p.add_argument("-n", "--num-samples", type=int, default=3, help="samples shown (the first n)")
    p.add_argument("--samples", default=None, help="comma-separated sample indices to show instead")
    p.add_argument("--out", default=None, help="directory for inspect.html and the PNGs (default: STORE.inspect)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the manifest names)")
    p.add_argument("--print-tokens", type=int, default=40, help="response tokens per sample in the printed table")
    p.add_argument("--stats-samples", type=int, default=20000, help="samples the PNGs summarise (0: all)")
    args = p.parse_args(argv)
    for name in ("num_samples", "print_tokens", "stats_samples"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


# ------------------------------------------------------------------------------------------------ samples


def chosen(args: argparse.Namespace, n: int, where: str) -> list[int]:
    """The sample indices to show; PrecomputeError naming an index out of range."""
    if args.samples is None:
        return list(range(min(args.num_samples, n)))
    try:
        idx = [int(x) for x in args.samples.split(",") if x.strip()]
    except ValueError:
        raise PrecomputeError(f"--samples {args.samples!r}: expected comma-separated integers") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise PrecomputeError(f"--samples: sample {bad[0]} out of range ({where} has {n} committed samples)")
    return idx


def view(sample: dict, index: int, tokenizer: Any) -> dict:
    """One sample's display data: decoded texts, per response token id / text / log-probs / advantage / top-k."""
    p = sample["prompt_length"]
    resp = sample["tokens"][p:]
    out = {
        "index": index,
        "prompt_index": sample["prompt_index"],
        "finish_reason": sample["finish_reason"],
        "answer": sample["answer"],
        "prompt_length": p,
        "ids": resp.tolist(),
        "behavior": sample["behavior_logprobs"][p:].tolist(),
        "teacher": sample["teacher_logprobs"][p:].tolist(),
        "advantage": store_view.advantage(sample)[p:].tolist(),
        "topk": None,
    }
    if "teacher_topk_ids" in sample:
        out["topk"] = list(zip(sample["teacher_topk_ids"][p:].tolist(), sample["teacher_topk_logprobs"][p:].tolist()))
    if tokenizer is not None:
        out["prompt_text"] = tokenizer.decode(sample["tokens"][:p].tolist(), skip_special_tokens=False)
        out["response_text"] = tokenizer.decode(resp.tolist(), skip_special_tokens=False)
        out["texts"] = store_view.token_texts(tokenizer, resp)
        out["decode"] = lambda t: tokenizer.decode([int(t)], skip_special_tokens=False)
    else:
        out["texts"] = [f"<{t}>" for t in resp.tolist()]
        out["decode"] = lambda t: f"<{t}>"
    return out


def _num(x: float) -> str:
    return "nan" if np.isnan(x) else f"{x:+.4f}"


def print_sample(v: dict, limit: int) -> None:
    n = len(v["ids"])
    print(f"\n--- sample {v['index']} (prompt {v['prompt_index']}, finish {v['finish_reason']}, "
          f"{v['prompt_length']} prompt + {n} response tokens, answer {v['answer']!r})")  # fmt: skip
    if "prompt_text" in v:
        print(f"prompt:   {v['prompt_text']!r}\nresponse: {v['response_text']!r}")
    top = "  teacher top-1" if v["topk"] is not None else ""
    print(f"  {'pos':>5}  {'token':<14} {'behaviour':>10} {'teacher':>10} {'advantage':>10}{top}")
    for j in range(min(n, limit)):
        row = f"  {v['prompt_length'] + j:>5}  {v['texts'][j]!r:<14} {_num(v['behavior'][j]):>10} "
        row += f"{_num(v['teacher'][j]):>10} {_num(v['advantage'][j]):>10}"
        if v["topk"] is not None and v["topk"][j][0][0] >= 0:
            row += f"  {v['decode'](v['topk'][j][0][0])!r} {v['topk'][j][1][0]:+.4f}"
        print(row)
    if n > limit:
        print(f"  ... {n - limit} more response tokens (all of them in the HTML page)")


# ------------------------------------------------------------------------------------------------ statistics


def store_stats(reader: Any, max_samples: int) -> dict:
    """Histogram of per-token advantages (scored response tokens) and the response lengths, over ``max_samples``
    evenly spaced samples (0: all), read in blocks: bounded memory on any store size."""
    n = len(reader)
    idx = np.arange(n) if max_samples == 0 or n <= max_samples else np.linspace(0, n - 1, max_samples).astype(int)
    counts, total, s, s2, abs_counts = np.zeros(len(BINS) - 1, np.int64), 0, 0.0, 0.0, np.zeros(101, np.int64)
    for a in range(0, len(idx), 256):
        for sample in reader.samples(idx[a : a + 256].tolist()):
            adv = store_view.advantage(sample)[sample["prompt_length"] :]
            adv = adv[np.isfinite(adv)].astype(np.float64)
            counts += np.histogram(np.clip(adv, -CLIP, CLIP), BINS)[0]
            abs_counts += np.histogram(np.minimum(np.abs(adv), CLIP), np.linspace(0, CLIP, 102))[0]
            total, s, s2 = total + adv.size, s + adv.sum(), s2 + (adv**2).sum()
    lengths = (reader.lengths - reader.prompt_lengths)[idx]
    mean = s / total if total else float("nan")
    std = float(np.sqrt(max(s2 / total - mean**2, 0.0))) if total else float("nan")
    # colour scale: the 95th percentile of |advantage| (to a bin of 0.1 nat), at least 0.1
    scale = 1.0
    if total:
        scale = max(0.1, float(np.linspace(0, CLIP, 102)[1:][np.searchsorted(np.cumsum(abs_counts), 0.95 * total)]))
    return {"samples": len(idx), "tokens": total, "mean": mean, "std": std, "hist": counts,
            "lengths": lengths, "scale": scale}  # fmt: skip


def plots(stats: dict) -> dict[str, bytes]:
    """PNG bytes of the advantage histogram and of the response-length histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if stats["tokens"]:
        ax.stairs(stats["hist"], BINS, fill=True, color="#4477aa")
        ax.axvline(stats["mean"], color="black", lw=1, ls="--", label=f"mean {stats['mean']:+.3f}")
        ax.legend()
        used = np.flatnonzero(stats["hist"])
        ax.set_xlim(BINS[max(used[0] - 5, 0)], BINS[min(used[-1] + 6, len(BINS) - 1)])  # zoom onto the data
    else:
        ax.text(0.5, 0.5, "no scored tokens with behaviour log-probs", ha="center", transform=ax.transAxes)
    ax.set(xlabel=f"advantage log p_T - log pi_b (nats; clipped to +-{CLIP:g})", ylabel="response tokens",
           title=f"per-token advantage ({stats['tokens']} tokens of {stats['samples']} samples)")  # fmt: skip
    out["advantages.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.hist(stats["lengths"], bins=min(50, max(1, len(np.unique(stats["lengths"])))), color="#4477aa")
    ax.set(xlabel="response tokens", ylabel="samples", title=f"response lengths ({stats['samples']} samples)")
    out["lengths.png"] = _png(fig)
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ HTML


def colour(adv: float, scale: float) -> str:
    """Background of a token: red (teacher less likely than the student) to green (more likely); grey for NaN."""
    if np.isnan(adv):
        return "rgba(128,128,128,0.18)"
    t = min(abs(adv) / scale, 1.0)
    rgb = "214,39,40" if adv < 0 else "44,160,44"
    return f"rgba({rgb},{0.12 + 0.78 * t:.3f})"


def tooltip(v: dict, j: int) -> str:
    lines = [f"token {v['ids'][j]} {v['texts'][j]!r} (position {v['prompt_length'] + j})",
             f"behaviour log p {_num(v['behavior'][j])}", f"teacher log p   {_num(v['teacher'][j])}",
             f"advantage       {_num(v['advantage'][j])}"]  # fmt: skip
    if v["topk"] is not None and v["topk"][j][0][0] >= 0:
        ids, lps = v["topk"][j]
        lines.append("teacher top-k: " + ", ".join(f"{v['decode'](i)!r} {lp:+.3f}" for i, lp in zip(ids, lps)))
    return "\n".join(lines)


def sample_html(v: dict, scale: float) -> str:
    spans = []
    for j, text in enumerate(v["texts"]):
        a = v["advantage"][j]
        shown = html.escape(text).replace("\n", "\u21b5\n") or "\u2205"
        spans.append(f'<span class="tok" style="background:{colour(a, scale)}" data-adv="{_num(a)}" '
                     f'title="{html.escape(tooltip(v, j))}">{shown}</span>')  # fmt: skip
    prompt = html.escape(v.get("prompt_text", f"{v['prompt_length']} prompt tokens (no tokenizer)"))
    head = (f"sample {v['index']} &middot; prompt {v['prompt_index']} &middot; finish {v['finish_reason']} &middot; "
            f"{len(v['ids'])} response tokens &middot; answer {html.escape(repr(v['answer']))}")  # fmt: skip
    return (f'<section class="sample" id="sample-{v["index"]}"><h2>{head}</h2><pre class="prompt">{prompt}</pre>'
            f'<pre class="response">{"".join(spans)}</pre></section>')  # fmt: skip


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em;color:#222}
pre{white-space:pre-wrap;word-break:break-word;font-size:14px;line-height:1.6}
pre.prompt{color:#555;background:#f6f6f6;padding:.5em}
.tok{border-radius:2px;padding:1px 0;cursor:help}.tok:hover{outline:1px solid #000}
h2{font-size:1em;margin-top:1.5em}.note{background:#fff3cd;padding:.5em}
.legend{display:inline-block;width:16em;height:1em;vertical-align:middle;
background:linear-gradient(to right,rgba(214,39,40,.9),rgba(214,39,40,.12) 49%,
rgba(44,160,44,.12) 51%,rgba(44,160,44,.9))}
img{max-width:48%;margin-right:1%}"""


def page(reader: Any, views: list[dict], stats: dict, pngs: dict[str, bytes], notes: list[str]) -> str:
    m = reader.manifest
    rows = {"kind": m.get("kind"), "policy": m.get("policy"), "teacher": m.get("teacher"),
            "samples": len(reader), "scored by the teacher": reader.teacher_committed, "top-k": reader.topk,
            "shards": m.get("dataset", {}).get("shards")}  # fmt: skip
    table = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items() if v is not None)
    note = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    s = stats["scale"]
    legend = (f"<p class=\"key\">advantage = log p<sub>T</sub> &minus; log &pi;<sub>b</sub> per response token: "
              f"{-s:+.1f} "
              f'<span class="legend"></span> {s:+.1f} nats (95th percentile of |advantage|; beyond it full colour; '
              f"grey: not scored). Hover a token for its numbers. Over {stats['samples']} samples: mean "
              f"{stats['mean']:+.4f}, std {stats['std']:.4f}.</p>")  # fmt: skip
    src = {k: "data:image/png;base64," + base64.b64encode(b).decode() for k, b in pngs.items()}
    imgs = "".join(f'<img alt="{k}" src="{v}">' for k, v in src.items())
    body = "".join(sample_html(v, s) for v in views)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>inspect {html.escape(reader.path)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(reader.path)}</h1>{note}<table>{table}</table>"
            f'{legend}<div class="charts">{imgs}</div>{body}</body></html>')  # fmt: skip


# ------------------------------------------------------------------------------------------------ main


def out_dir(args: argparse.Namespace, reader: Any) -> str:
    if args.out:
        return args.out
    if "://" in args.store:
        raise PrecomputeError(f"{args.store}: not a local store; pass --out DIR for the HTML page and the PNGs")
    return args.store.rstrip("/") + ".inspect"


def write_files(directory: str, files: dict[str, bytes]) -> None:
    """Each file written beside its final name and renamed into place: a crash leaves no half-written page."""
    os.makedirs(directory, exist_ok=True)
    for name, data in files.items():
        write_atomic(os.path.join(directory, name), data)


def run(args: argparse.Namespace) -> str:
    reader, notes = store_view.open_store(args.store)
    if len(reader) == 0:
        raise PrecomputeError(f"{reader.path}: no committed samples to inspect")
    tokenizer = store_view.load_tokenizer(reader, args.tokenizer, required=False)
    indices = chosen(args, len(reader), reader.path)
    directory = out_dir(args, reader)
    print(f"store: {reader.path} ({reader.manifest.get('kind')}; {len(reader)} samples, {reader.teacher_committed} "
          f"scored by the teacher, top-k {reader.topk})")  # fmt: skip
    for n in notes:
        print(f"note: {n}")
    if tokenizer is None:
        print("note: no tokenizer found (pass --tokenizer DIR): tokens are shown as ids")
    views = [view(s, i, tokenizer) for i, s in zip(indices, reader.samples(indices))]
    for v in views:
        print_sample(v, args.print_tokens)
    stats = store_stats(reader, args.stats_samples)
    pngs = plots(stats)
    write_files(directory, {**pngs, "inspect.html": page(reader, views, stats, pngs, notes).encode("utf-8")})
    line = f"\nwrote {os.path.join(directory, 'inspect.html')}, advantages.png, lengths.png"
    print(line, flush=True)
    return line


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
