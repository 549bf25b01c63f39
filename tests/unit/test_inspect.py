"""precompute.inspect on hand-written stores whose log-probs are known: the printed table, the HTML page (token
spans, colours, tooltips with the teacher's top-k), the PNGs, a store under writing, a dataset of shards.

The demo store's page in a real browser (headless chromium) is checked in tests/integration/test_ingest_demo.py.
"""

import html.parser
import os
import re

import numpy as np
import pytest

from lopd_jax.data import prompts
from lopd_jax.demo import synthetic
from lopd_jax.store import RolloutStore, provenance
from lopd_jax.store.dataset import shard_name
from precompute import inspect

PROMPTS = ["Add: 1+2", "Add: 3+4", "Add: 5+5"]
RESPONSES = ["1+2=3\n#### 3", "#### 7", "#### 10"]


def samples(tok) -> list[dict]:
    """Three samples; behaviour log-probs -0.5, -1.0, ... per response token (known numbers)."""
    out = []
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        prompt = prompts.encode_prompt(tok, {"prompt": p})
        resp = [*tok(r, add_special_tokens=False)["input_ids"], 2]
        behavior = -0.5 * np.arange(1, len(resp) + 1)
        out.append({"tokens": prompt + resp, "prompt_length": len(prompt), "finish_reason": "stop",
                    "behavior_logprobs": behavior, "prompt_index": i, "answer": r[-2:].strip()})  # fmt: skip
    return out


def teacher(rows: list[dict]) -> tuple[list, tuple]:
    """Teacher log-probs -0.25 * (j + 1) (so advantage = +0.25 * (j + 1)) and top-2 (the token, then id 5)."""
    lps, ids, tlps = [], [], []
    for r in rows:
        n = len(r["tokens"]) - r["prompt_length"]
        lp = -0.25 * np.arange(1, n + 1)
        lps.append(lp)
        ids.append(np.stack([np.asarray(r["tokens"][r["prompt_length"] :]), np.full(n, 5)], -1))
        tlps.append(np.stack([lp, lp - 3.0], -1))
    return lps, (ids, tlps)


def make_store(path, tok_dir, rows, scored: int, manifest: dict | None = None):
    m = {"kind": "rollouts", "tokenizer": provenance.fingerprint_tokenizer(tok_dir), "policy_path": str(tok_dir)}
    w = RolloutStore.create(path, {**m, **(manifest or {})}, topk=2)
    w.append(rows)
    w.flush()
    if scored:
        lps, topk = teacher(rows[:scored])
        w.write_teacher(0, lps, topk=topk)
        w.flush()
    return w


@pytest.fixture
def store(tmp_path):
    tok_dir = tmp_path / "tok"
    synthetic.build_tokenizer(tok_dir)
    tok = prompts.load_tokenizer(tok_dir)
    rows = samples(tok)
    make_store(tmp_path / "store", tok_dir, rows, scored=2).close()
    return {"path": tmp_path / "store", "tok_dir": tok_dir, "tok": tok, "rows": rows}


class Spans(html.parser.HTMLParser):
    """(style, data-adv, title, text) of every token span of a page."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and a.get("class") == "tok":
            self._open = [a["style"], a["data-adv"], a["title"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[3] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None


def test_prints_and_draws_each_response_token_with_its_advantage_and_topk(store, tmp_path, capsys):
    out = tmp_path / "view"
    assert inspect.main([str(store["path"]), "-n", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    tok = store["tok"]
    assert "3 samples, 2 scored by the teacher, top-k 2" in text
    for p, r in zip(PROMPTS, RESPONSES):
        assert repr(r + "<|im_end|>") in text and p in text
    # sample 0, first response token: behaviour -0.5, teacher -0.25, advantage +0.25, top-1 the token itself
    first = tok.decode([store["rows"][0]["tokens"][store["rows"][0]["prompt_length"]]])
    assert re.search(
        rf"{re.escape(repr(first))}\s+-0\.5000\s+-0\.2500\s+\+0\.2500\s+{re.escape(repr(first))} -0\.2500", text
    )
    assert re.search(r"-0\.5000\s+nan\s+nan", text)  # sample 2 is not scored

    page = (out / "inspect.html").read_text()
    parser = Spans()
    parser.feed(page)
    n_resp = [len(r["tokens"]) - r["prompt_length"] for r in store["rows"]]
    assert len(parser.spans) == sum(n_resp)
    advs = [s[1] for s in parser.spans]
    want = [f"{0.25 * (j + 1):+.4f}" for n in n_resp[:2] for j in range(n)] + ["nan"] * n_resp[2]
    assert advs == want
    assert all("44,160,44" in s[0] for s in parser.spans[: sum(n_resp[:2])])  # positive: green
    assert all("128,128,128" in s[0] for s in parser.spans[sum(n_resp[:2]) :])  # unscored: grey
    assert "teacher top-k: " + repr(first) + " -0.250, " + repr(tok.decode([5])) + " -3.250" in parser.spans[0][2]
    assert "".join(s[3] for s in parser.spans[: n_resp[0]]).replace("\u21b5", "") == RESPONSES[0] + "<|im_end|>"
    for name in ("advantages.png", "lengths.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 2  # self-contained: the PNGs are inside the page


def test_a_store_under_writing_is_read_as_of_its_last_commit_and_says_who_writes(store, tmp_path, capsys):
    w = RolloutStore.open_for_append(store["path"])
    w.append(store["rows"][:1])  # buffered, not committed: not shown
    try:
        assert inspect.main([str(store["path"]), "-n", "1", "--out", str(tmp_path / "v")]) == 0
    finally:
        w.release()
    text = capsys.readouterr().out
    assert f"being written by pid {os.getpid()} on host" in text and "read as of its last commit" in text
    assert "read: 3 committed samples, 2 scored by the teacher" in text
    assert "being written by pid" in (tmp_path / "v" / "inspect.html").read_text()
    assert inspect.main([str(store["path"]), "-n", "1", "--out", str(tmp_path / "v")]) == 0
    assert "being written" not in capsys.readouterr().out  # released: no note


def test_a_dataset_of_shards_reads_as_one(store, tmp_path, capsys):
    ds = tmp_path / "ds"
    rows = store["rows"]
    for i, part in enumerate((rows[:2], rows[2:])):
        shard = {"index": i, "count": 2, "expected": 2}  # shard 1 holds 1 of its 2: its precompute is unfinished
        make_store(ds / shard_name(i, 2), store["tok_dir"], part, scored=0, manifest={"shard": shard}).close()
    assert inspect.main([str(ds), "--samples", "2,0", "--out", str(tmp_path / "v")]) == 0
    text = capsys.readouterr().out
    assert "3 samples, 0 scored" in text and "shard-00001-of-00002: 1 of its 2 samples are committed" in text
    assert text.index("--- sample 2 (prompt 2") < text.index("--- sample 0 (prompt 0")
    assert "<th>shards</th><td>2</td>" in (tmp_path / "v" / "inspect.html").read_text()
    assert not (ds.parent / "ds.inspect").exists()


def test_refusals_are_one_line(store, tmp_path, capsys):
    assert inspect.main([str(store["path"]), "--samples", "0,7", "--out", str(tmp_path / "v")]) == 2
    want = f"error: --samples: sample 7 out of range ({store['path']} has 3 committed samples)"
    assert capsys.readouterr().err.strip() == want
    other = tmp_path / "other_tok"
    synthetic.build_tokenizer(other)
    cfg = other / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"eos_token": "<|im_end|>"', '"eos_token": "<|endoftext|>"'))
    assert inspect.main([str(store["path"]), "--tokenizer", str(other), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not the store's" in err
    assert inspect.main([str(tmp_path / "nope")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
