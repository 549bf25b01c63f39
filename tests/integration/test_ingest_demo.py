"""The demo's prompt sets (configs/demo_smoke.yaml's task stage) as parquet and as a ``datasets`` directory give the
same stores, bit for bit, as the JSONL originals; the demo's scored store seen through precompute.inspect in a real
browser (headless chromium); precompute.export and import_samples round trips, bit for bit.

Models: the tiny random Qwen3 of tests/helpers/precompute.py with the demo's tokenizer (synthetic.build_tokenizer),
as student and teacher; the sampling arguments are the smoke config's.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.precompute import build_model

from lopd_jax.data import prompts
from lopd_jax.demo import synthetic
from lopd_jax.inference import evaluation as ev
from lopd_jax.store import RolloutStore
from precompute import export, import_jsonl, import_samples, inspect, rollouts, teacher_logprobs

TASK = [
    "--seed",
    "0",
    "--n-teacher",
    "32",
    "--n-sft",
    "16",
    "--n-opd",
    "16",
    "--n-eval",
    "8",
    "--min-operands",
    "5",
    "--max-operands",
    "5",
    "--min-digits",
    "1",
    "--max-digits",
    "1",
    "--chain",
]  # fmt: skip  (demo_smoke.yaml)
SFT = ["--sft-teacher", "--temperature", "0", "--max-new-tokens", "16", "--batch-size", "16"]
OPD = ["--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "16", "--batch-size", "16", "--seed", "0"]
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def convert(jsonl: Path) -> dict[str, Path]:
    """The JSONL prompt set and its parquet and ``datasets`` (save_to_disk) conversions."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    parquet = jsonl.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    ds = jsonl.with_name(jsonl.stem + "_ds")
    datasets.Dataset.from_list(rows).save_to_disk(str(ds))
    return {"jsonl": jsonl, "parquet": parquet, "datasets": ds}


def arrays(path: Path) -> dict[str, np.ndarray]:
    store = RolloutStore.open(path)
    return {name: arr.read().result() for name, arr in store.arrays.items()}


def assert_same_arrays(a: Path, b: Path) -> None:
    got, want = arrays(a), arrays(b)
    assert got.keys() == want.keys()
    for name in want:  # bit for bit: NaNs in the same places, every other value identical
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest_demo")
    assert synthetic.main(["--out", str(root / "task"), *TASK]) == 0
    build_model(root / "student", 0, eos_bias=0.17)
    build_model(root / "teacher", 1)
    sets = {name: convert(root / "task" / f"{name}.jsonl") for name in ("teacher", "sft", "opd", "eval")}
    return {"root": root, "tok": root / "task" / "tokenizer", "sets": sets}


def run_rollouts(demo, fmt: str, name: str, flags: list[str]) -> Path:
    out = demo["root"] / f"{name}_{fmt}"
    if not out.exists():
        argv = ["--policy", str(demo["root"] / "student"), "--prompts", str(demo["sets"][name][fmt]), "--out", str(out)]
        assert rollouts.main(argv + flags) == 0
    return out


def scored_store(demo) -> Path:
    """The demo's Lightning OPD input: the student's rollouts of opd scored by the teacher (top-3 kept)."""
    out = demo["root"] / "scored"
    if not out.exists():
        store = run_rollouts(demo, "jsonl", "opd", OPD)
        argv = ["--teacher", str(demo["root"] / "teacher"), "--store", str(store), "--out", str(out), "--top-k", "3"]
        assert teacher_logprobs.main(argv) == 0
    return out


def test_demo_prompt_sets_as_parquet_and_datasets_give_the_same_stores(demo):
    root, tok = demo["root"], demo["tok"]
    for fmt in ("jsonl", "parquet", "datasets"):
        data = demo["sets"]["teacher"][fmt]
        assert import_jsonl.main(["--tokenizer", str(tok), "--data", str(data), "--out", str(root / f"t_{fmt}")]) == 0
    manifests = {}
    for fmt in ("parquet", "datasets"):
        assert_same_arrays(root / f"t_{fmt}", root / "t_jsonl")
        for name, flags in (("sft", SFT), ("opd", OPD)):
            assert_same_arrays(run_rollouts(demo, fmt, name, flags), run_rollouts(demo, "jsonl", name, flags))
            manifests[fmt] = RolloutStore.open(root / f"{name}_{fmt}").manifest
    jsonl = RolloutStore.open(root / "opd_jsonl").manifest
    assert jsonl["prompts"]["sha256"] == prompts.read_prompt_rows(demo["sets"]["opd"]["jsonl"]).sha256
    for fmt, m in manifests.items():  # what differs: the hash of the bytes read (and the paths given)
        assert m["prompts"]["sha256"] != jsonl["prompts"]["sha256"]
        assert {k: v for k, v in m["prompts"].items() if k != "sha256"} == {"kept": 16, "skipped": 0}
        for key in ("policy", "tokenizer", "chat_template", "sampling", "rollout_args", "committed_tokens"):
            assert m[key] == jsonl[key], (fmt, key)
    tokenizer = prompts.load_tokenizer(tok)
    want = ev.load_eval_set(demo["sets"]["eval"]["jsonl"])
    for fmt in ("parquet", "datasets"):
        got = ev.load_eval_set(demo["sets"]["eval"][fmt])
        assert [r["answer"] for r in got] == [r["answer"] for r in want]
        assert prompts.encode_prompts(tokenizer, got) == prompts.encode_prompts(tokenizer, want)


def _coloured_pixels(png: Path) -> tuple[int, int]:
    """(red-tinted, green-tinted) pixels of a screenshot: token backgrounds, nothing else on the page is tinted."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r - g > 12) & (r - b > 12)  # the palest tint (alpha 0.12 over white): >= 14 levels
    green = (g - r > 12) & (g - b > 12)
    return int(red.sum()), int(green.sum())


def browser() -> str:
    """The headless browser; skips without one, except where CI requires it (.ci/run installs chromium)."""
    if BROWSER is None and os.environ.get("LOPD_REQUIRE_BROWSER"):
        pytest.fail("LOPD_REQUIRE_BROWSER is set but no chromium is installed: the browser test would not run")
    if BROWSER is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium)")
    return BROWSER


def test_the_demo_store_page_shows_coloured_tokens_in_a_browser(demo, tmp_path, capsys):
    chromium = browser()
    store = scored_store(demo)
    out = tmp_path / "view"
    assert inspect.main([str(store), "-n", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "16 samples, 16 scored by the teacher, top-k 3" in text
    page = out / "inspect.html"
    sample = RolloutStore.open(store).samples(range(4))
    n_tokens = sum(len(s["tokens"]) - s["prompt_length"] for s in sample)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1400"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="tok"') == n_tokens  # every response token of the 4 samples is a span
    assert dom.stdout.count("teacher top-k: ") == n_tokens
    # Only token backgrounds may be tinted: the colour key and the charts are cut from the copy screenshotted, and
    # a control copy without the spans' backgrounds must show no tint at all.
    tokens_only = re.sub(r'<p class="key">.*?</p>|<div class="charts">.*?</div>', "", page.read_text())
    plain = re.sub(r'style="background:[^"]*"', "", tokens_only)
    tinted = {}
    for name, content in (("tokens", tokens_only), ("plain", plain)):
        (out / f"{name}.html").write_text(content)
        shot = tmp_path / f"{name}.png"
        cmd = [chromium, *flags, f"--screenshot={shot}", (out / f"{name}.html").as_uri()]
        proc = subprocess.run(cmd, capture_output=True, timeout=120)
        assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
        tinted[name] = _coloured_pixels(shot)
    assert tinted["plain"] == (0, 0)
    red, green = tinted["tokens"]
    assert red > 200 and green > 200, tinted  # the teacher disagrees on some tokens and agrees more on others


def test_export_then_import_gives_back_the_store_bit_for_bit(demo, tmp_path, capsys):
    store = scored_store(demo)
    reader = RolloutStore.open(store)
    tok = prompts.load_tokenizer(demo["tok"])
    for fmt in ("parquet", "datasets"):
        out = tmp_path / f"samples_{fmt}"
        assert export.main([str(store), "--format", fmt, str(out)]) == 0
        table = pq.read_table(out) if fmt == "parquet" else datasets.load_from_disk(str(out)).data.table
        assert table.num_rows == len(reader) == 16
        s = reader.sample(5)
        row = table.slice(5, 1).to_pylist()[0]
        np.testing.assert_array_equal(row["tokens"], s["tokens"])
        np.testing.assert_array_equal(
            np.asarray(row["advantage"], np.float32), s["teacher_logprobs"] - s["behavior_logprobs"]
        )
        assert row["response_text"] == tok.decode(s["tokens"][s["prompt_length"] :].tolist())
        assert row["teacher_topk_ids"][s["prompt_length"]] == s["teacher_topk_ids"][s["prompt_length"]].tolist()
        assert json.loads(row["answer_json"]) == s["answer"] and row["scored"]
        back = tmp_path / f"back_{fmt}"
        assert import_samples.main([str(out), "--out", str(back)]) == 0
        assert_same_arrays(back, store)
        m = RolloutStore.open(back).manifest
        for key in ("policy", "teacher", "sampling", "prompts", "layout", "topk", "teacher_committed"):
            assert m[key] == reader.manifest[key], key
        capsys.readouterr()
        assert export.main([str(store), "--format", fmt, str(out)]) == 2  # never over an existing path
        assert "exists; export writes a new path" in capsys.readouterr().err
