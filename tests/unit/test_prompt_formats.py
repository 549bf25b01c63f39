"""Prompt sets in the formats in use (lopd_jax.data.prompts): JSONL, parquet files and shard directories, ``datasets``
save_to_disk directories, verl's layout, column keys, the hash of the bytes read, and one-line refusals.

The end-to-end check that the demo's prompt sets give the same stores in every format is in
tests/integration/test_ingest_demo.py.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lopd_jax.data import prompts
from lopd_jax.data.prompts import PromptError
from lopd_jax.demo import synthetic
from lopd_jax.inference import evaluation as ev
from precompute import import_jsonl

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    {"prompt": "Add: 1+2", "answer": "3", "completion": "1+2=3\n#### 3"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add: 4+4"}],
     "answer": "8", "completion": "#### 8"},
    {"prompt": "Add: 9+9", "answer": "18", "completion": "#### 18"},
]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict], **kw) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path


def write_dataset(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content(rows: list[dict]) -> list[dict]:
    """The rows without their place (``line`` in JSONL, ``row`` in Arrow formats)."""
    return [{k: v for k, v in r.items() if k not in ("line", "row")} for r in rows]


def test_parquet_shards_and_datasets_directories_read_as_the_jsonl_rows(tmp_path):
    # A mixed file (prompt and messages rows) is not one Arrow schema; a set of one kind is (the demo's are).
    files = synthetic.write_prompt_sets(tmp_path / "task", seed=0, n_sft=8, n_opd=1, n_eval=4)
    rows = [json.loads(line) for line in files["sft"].read_text().splitlines()]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "part-00001.parquet", rows[5:])  # sorted by name: part-00000 is read first
    write_parquet(shards / "part-00000.parquet", rows[:5], row_group_size=2)  # several record batches
    want = prompts.read_prompt_rows(files["sft"], require=("completion",))
    assert want.sha256 == sha256_bytes(files["sft"].read_bytes())
    assert [r["line"] for r in want.rows] == list(range(1, 9))
    for source in (write_parquet(tmp_path / "sft.parquet", rows), shards, write_dataset(tmp_path / "sft_ds", rows)):
        got = prompts.read_prompt_rows(source, require=("completion",))
        assert content(got.rows) == content(want.rows), source
        assert got.sha256 != want.sha256
    assert [r["row"] for r in prompts.read_prompts(shards)] == [0, 1, 2, 3, 4, 0, 1, 2]  # the row in its shard
    evals = [json.loads(line) for line in files["eval"].read_text().splitlines()]
    want_eval = ev.load_eval_set(files["eval"])
    for source in (write_parquet(tmp_path / "eval.parquet", evals), write_dataset(tmp_path / "eval_ds", evals)):
        assert content(ev.load_eval_set(source)) == content(want_eval)


def test_verl_layout_is_recognised_and_only_the_used_columns_are_read(tmp_path):
    verl = [
        {"data_source": "dapo", "prompt": [{"role": "user", "content": f"Add: {i}+1"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": str(i + 1)}, "extra_info": {"index": i, "split": "train"}}
        for i in range(3)
    ]  # fmt: skip
    for source in (write_parquet(tmp_path / "train.parquet", verl), write_dataset(tmp_path / "train_ds", verl)):
        rows = prompts.read_prompts(source)
        assert [r["messages"][0]["content"] for r in rows] == ["Add: 0+1", "Add: 1+1", "Add: 2+1"]
        assert [r["answer"] for r in rows] == ["1", "2", "3"]
        assert all(set(r) == {"messages", "reward_model", "answer", "row"} for r in rows)  # no extra_info, ability
        assert [r["answer"] for r in ev.load_eval_set(source)] == ["1", "2", "3"]
    jsonl = prompts.read_prompts(write_jsonl(tmp_path / "train.jsonl", verl))  # the same layout in JSONL
    assert [r["answer"] for r in jsonl] == ["1", "2", "3"] and "messages" in jsonl[0]


def test_prompt_and_answer_keys_name_any_column_nested_or_not(tmp_path):
    raw = [{"question": "Add: 2+2", "meta": {"solution": {"final": 4}}}, {"question": "Add: 1+1", "meta": None}]
    for source in (write_jsonl(tmp_path / "q.jsonl", raw[:1]), write_parquet(tmp_path / "q.parquet", raw[:1])):
        (row,) = prompts.read_prompts(source, prompt_key="question", answer_key="meta.solution.final")
        assert row["prompt"] == "Add: 2+2" and row["answer"] == 4
        (row,) = ev.load_eval_set(source, prompt_key="question", answer_key="meta.solution.final")
        assert row["answer"] == "4"
    bad = write_parquet(tmp_path / "q2.parquet", raw)
    with pytest.raises(PromptError, match=r"q2\.parquet: row 1: no field 'meta\.solution\.final' .*meta has a None"):
        prompts.read_prompts(bad, prompt_key="question", answer_key="meta.solution.final")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
def test_bad_rows_and_missing_columns_name_the_file_the_row_and_the_columns(tmp_path, fmt):
    write = {"jsonl": write_jsonl, "parquet": write_parquet, "datasets": write_dataset}[fmt]
    name = {"jsonl": "p.jsonl", "parquet": "p.parquet", "datasets": "p_ds"}[fmt]
    path = write(tmp_path / name, [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    if fmt == "jsonl":  # a JSONL file has no schema: the first row without the field is named
        miss = (
            r"p\.jsonl:1: no field 'query' \(--prompt-key / prompt_key\); the row has \['answer', 'line', 'question'\]"
        )
    else:
        miss = rf"{name}: no column 'query' \(--prompt-key / prompt_key\); its columns: \['question', 'answer'\]"
    with pytest.raises(PromptError, match=miss):
        prompts.read_prompts(path, prompt_key="query")
    default = r"each row needs exactly one of" if fmt == "jsonl" else r"no column 'prompt' or 'messages'.*'question'"
    with pytest.raises(PromptError, match=default):
        prompts.read_prompts(path)
    path = write(tmp_path / ("2" + name), [{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}])
    where = {"jsonl": r"2p\.jsonl:2", "parquet": r"2p\.parquet: row 1", "datasets": r"2p_ds: row 1"}[fmt]
    with pytest.raises(PromptError, match=rf"{where}: 'prompt' must be a string, got NoneType"):
        prompts.read_prompts(path)


def test_cli_refusals_are_one_line_and_exit_2(tmp_path, capsys):
    tok = tmp_path / "tok"
    synthetic.build_tokenizer(tok)
    not_parquet = tmp_path / "data.parquet"
    not_parquet.write_text('{"prompt": "a", "completion": "b"}\n')
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    no_completion = write_parquet(tmp_path / "nc.parquet", [{"prompt": "a"}])
    two_splits = tmp_path / "splits"
    one = datasets.Dataset.from_list(ROWS[:1])
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(two_splits))
    capsys.readouterr()  # the fixtures' progress bars
    cases = [
        (not_parquet, r"data\.parquet: not a parquet file \(.*magic bytes"),
        (empty_dir, r"empty: a directory, but neither a datasets save_to_disk directory \(state\.json\) nor parquet"),
        (no_completion, r"nc\.parquet: no column 'completion' \(a required column\); its columns: \['prompt'\]"),
        (two_splits, r"splits: a DatasetDict with splits \['train', 'test'\]: name one, e\.g\. .*splits/train"),
    ]
    for data, message in cases:
        out = tmp_path / f"store_{data.name}"
        assert import_jsonl.main(["--tokenizer", str(tok), "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and re.search(message, err), err
        assert not out.exists()
    assert len(prompts.read_prompts(two_splits / "train")) == 1  # one split of a DatasetDict is a dataset


def test_directory_hash_covers_names_and_bytes_and_a_pipe_is_read_once(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    a = write_parquet(d / "a.parquet", [{"prompt": "x", "answer": "1"}])
    b = write_parquet(d / "b.parquet", [{"prompt": "y", "answer": "2"}])
    (d / "notes.txt").write_text("not read, not hashed")
    h = hashlib.sha256()  # the documented definition, computed here independently
    for p in (a, b):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode() + p.read_bytes())
    first = prompts.read_prompt_rows(d).sha256
    assert first == "sha256:" + h.hexdigest()
    (d / "notes.txt").write_text("changed")
    assert prompts.read_prompt_rows(d).sha256 == first
    b.rename(d / "c.parquet")  # same bytes, another name: another set of shards (and order)
    assert prompts.read_prompt_rows(d).sha256 != first

    data = write_jsonl(tmp_path / "p.jsonl", ROWS).read_bytes()
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    got = prompts.read_prompt_rows(f"/dev/fd/{r}", require=("completion",))
    writer.join()
    os.close(r)
    assert got.sha256 == sha256_bytes(data) and content(got.rows) == ROWS


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line(tmp_path):
    """``org/name`` that is no local path is a hub dataset; offline (as here) it fails in one line, exit 2."""
    tok = tmp_path / "tok"
    synthetic.build_tokenizer(tok)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    argv = ["--tokenizer", str(tok), "--data", "some-org/some-set:train", "--out", str(tmp_path / "s")]
    proc = subprocess.run([sys.executable, "-m", "precompute.import_jsonl", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    want = "error: some-org/some-set:train: no such local path, and cannot load it from the Hugging Face hub ("
    assert proc.stderr.startswith(want)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "s").exists()
    with pytest.raises(PromptError, match="cannot read"):  # a missing path with a file suffix stays a file
        prompts.read_prompts(tmp_path / "some" / "set.jsonl")


def test_the_trainer_config_keys_reach_online_opd_and_evaluation(tmp_path):
    from helpers.prompts import model_dir

    from lopd_jax.models import hf
    from lopd_jax.training import config as config_lib
    from lopd_jax.training import setup as train_setup
    from lopd_jax.training.config import ConfigError, TrainConfig

    policy = model_dir(tmp_path / "policy", template=True, generation_eos=None)
    raw_rows = [{"question": "Add: 1+2", "meta": {"final": "3"}}, {"question": "Add: 4+4", "meta": {"final": "8"}}]
    data = write_parquet(tmp_path / "q.parquet", raw_rows)
    raw = {"mode": "opd", "model": {"init": str(policy), "teacher": str(policy)},
           "data": {"prompts": str(data), "prompt_key": "question"},
           "eval": {"prompts": str(data), "prompt_key": "question", "answer_key": "meta.final"}}  # fmt: skip
    cfg = config_lib.build(TrainConfig, raw)
    setup = train_setup.Setup(hf.load_config(str(policy)), None, {}, str(policy))
    train_setup._check_prompts(cfg, setup)
    want = prompts.encode_prompts(setup.tokenizer, [{"prompt": r["question"]} for r in raw_rows])
    assert setup.prompts == want
    train_setup._check_eval_set(cfg, setup)
    assert [r["answer"] for r in ev.load_eval_set(data, "question", "meta.final")] == ["3", "8"]
    bad = config_lib.build(TrainConfig, {**raw, "data": {"prompts": str(data)}})
    with pytest.raises(ConfigError, match=r"data\.prompts: .*q\.parquet: no column 'prompt' or 'messages'.*'question'"):
        train_setup._check_prompts(bad, setup)
