"""Stage expansion, placeholder resolution and input-keyed caching of lopd_jax.training.pipeline."""

import json

import pytest
import yaml

from lopd_jax import train
from lopd_jax.store.lock import FileLock
from lopd_jax.training.pipeline import LOCK_FILE, PipelineError, expand_stages, run_pipeline

WRITE = 'python -c "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"'


def _config(tmp_path, param_file):
    return {
        "run_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "a", "cmd": f"{WRITE} {{out}}/a.txt {param_file}"},
            {"name": "b", "cmd": f"{WRITE} {{out}}/b.txt {{a}}/a.txt", "foreach": {"seed": [0, 1]}},
            {"name": "c", "cmd": f"{WRITE} {{out}}/r.json {{b}}", "foreach": {"seed": [0, 1]}},
        ],
    }


def test_runs_then_caches_then_reruns_downstream_of_a_changed_file(tmp_path):
    param = tmp_path / "param.yaml"
    param.write_text("x: 1\n")
    cfg = _config(tmp_path, param)
    first = run_pipeline(cfg, "test.yaml")
    assert [r["name"] for r in first] == ["a", "b-seed0", "b-seed1", "c-seed0", "c-seed1"]
    assert not any(r["cached"] for r in first)
    # {b} inside c-seed1 resolves to b-seed1's directory.
    assert (tmp_path / "run" / "c-seed1" / "r.json").read_text() == str(tmp_path / "run" / "b-seed1")
    assert all(r["cached"] for r in run_pipeline(cfg, "test.yaml"))
    param.write_text("x: 2\n")  # content of a file named in a command changed: everything downstream reruns
    assert not any(r["cached"] for r in run_pipeline(cfg, "test.yaml"))


def test_result_json_is_collected(tmp_path):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "stages": [{"name": "e", "cmd": f"{WRITE} {{out}}/eval.json '{{\"acc\": 0.5}}'", "result": "eval.json"}],
    }
    (rec,) = run_pipeline(cfg, "x.yaml")
    assert rec["result"] == {"acc": 0.5}
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())[0]["name"] == "e"


def test_failed_stage_names_its_log_and_leaves_no_marker(tmp_path):
    cfg = {"run_dir": str(tmp_path / "run"), "stages": [{"name": "bad", "cmd": "python -c 'raise SystemExit(3)'"}]}
    with pytest.raises(PipelineError, match=r"'bad' failed \(exit 3\).*stage.log"):
        run_pipeline(cfg, "x.yaml")
    assert not (tmp_path / "run" / "bad" / "stage.json").exists()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "non-empty list"),
        ([{"name": "a"}], r"stages\[0\] needs 'name' and 'cmd'"),
        ([{"name": "a", "cmd": "x", "bogus": 1}], "unknown key"),
        ([{"name": "a", "cmd": "x"}, {"name": "a", "cmd": "y"}], "duplicate stage names"),
    ],
)
def test_malformed_stages_are_refused(stages, message):
    with pytest.raises(PipelineError, match=message):
        expand_stages(stages, "demo.yaml")


def test_unknown_placeholder_and_forward_reference(tmp_path):
    unknown = {"run_dir": str(tmp_path), "stages": [{"name": "a", "cmd": "echo {nope}"}]}
    with pytest.raises(PipelineError, match=r"unknown placeholder \{nope\}"):
        run_pipeline(unknown, "x.yaml")
    forward = {"run_dir": str(tmp_path), "stages": [{"name": "a", "cmd": "echo {b}"}, {"name": "b", "cmd": "echo"}]}
    with pytest.raises(PipelineError, match="runs later"):
        run_pipeline(forward, "x.yaml")


def test_stage_output_is_relayed_raw_so_progress_bars_show(tmp_path, capfd):
    """A tqdm bar redraws with '\\r' and no newline; relaying lines (text mode) turned every '\\r' into a line
    break and showed nothing until the stage printed a newline. The relay and the log keep the bytes."""
    code = "import sys; sys.stdout.write('step 1/3\\rstep 2/3\\rstep 3/3'); sys.stdout.flush()"
    cfg = {"run_dir": str(tmp_path / "run"), "stages": [{"name": "bar", "cmd": f'python -c "{code}"'}]}
    run_pipeline(cfg, "x.yaml")
    assert "step 1/3\rstep 2/3\rstep 3/3" in capfd.readouterr().out
    assert (tmp_path / "run" / "bar" / "stage.log").read_bytes() == b"step 1/3\rstep 2/3\rstep 3/3"


def test_a_users_directory_in_the_way_of_a_stage_is_never_deleted(tmp_path):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "mine.txt").write_text("user data")
    cfg = {"run_dir": str(tmp_path / "run"), "stages": [{"name": "a", "cmd": f"{WRITE} {{out}}/a.txt x"}]}
    with pytest.raises(PipelineError, match=r"stage 'a': .*/run/a exists but was not made by this pipeline"):
        run_pipeline(cfg, "test.yaml")
    assert (tmp_path / "run" / "a" / "mine.txt").read_text() == "user data"


@pytest.mark.parametrize("name", ["..", "../elsewhere", "/abs", "a/b", ""])
def test_stage_names_stay_inside_the_run_dir(name):
    with pytest.raises(PipelineError, match="not a plain directory name|needs 'name'"):
        expand_stages([{"name": name, "cmd": "true"}], "test.yaml")


def test_a_changed_input_directory_outside_the_run_dir_reruns_the_stage(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_text("1")
    cfg = {"run_dir": str(tmp_path / "run"), "stages": [{"name": "a", "cmd": f"{WRITE} {{out}}/a.txt {model}"}]}
    run_pipeline(cfg, "test.yaml")
    assert run_pipeline(cfg, "test.yaml")[0]["cached"]
    (model / "w.bin").write_text("22")  # new weights in the same directory
    assert not run_pipeline(cfg, "test.yaml")[0]["cached"]


def test_missing_program_and_corrupt_files_are_one_clear_error(tmp_path):
    cfg = {"run_dir": str(tmp_path / "run"), "stages": [{"name": "a", "cmd": "no-such-program-xyz arg"}]}
    with pytest.raises(PipelineError, match="stage 'a': cannot start 'no-such-program-xyz'"):
        run_pipeline(cfg, "test.yaml")
    stage = {"name": "e", "cmd": f"{WRITE} {{out}}/eval.json '{{broken'", "result": "eval.json"}
    with pytest.raises(PipelineError, match=r"stage 'e': result file .*eval.json is not readable JSON"):
        run_pipeline({"run_dir": str(tmp_path / "run2"), "stages": [stage]}, "test.yaml")
    (tmp_path / "run2" / "e" / "stage.json").write_text("{trunc")  # a damaged marker: the stage just reruns
    stage["cmd"] = f"{WRITE} {{out}}/eval.json '{{\"acc\": 1}}'"
    assert run_pipeline({"run_dir": str(tmp_path / "run2"), "stages": [stage]}, "test.yaml")[0]["result"] == {"acc": 1}


def test_a_second_pipeline_in_the_same_run_dir_is_refused_and_touches_nothing(tmp_path, capsys):
    param = tmp_path / "param.yaml"
    param.write_text("x: 1\n")
    cfg = _config(tmp_path, param)
    run_pipeline(cfg, "test.yaml")
    run = tmp_path / "run"

    def snapshot():
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}

    before = snapshot()
    param.write_text("x: 2\n")  # every stage would rerun, clearing its directory
    other = FileLock.acquire(run / LOCK_FILE, "another run", "pipeline", "this run directory")  # as a second process
    holder = other.record()
    try:
        with pytest.raises(PipelineError, match=r"run_dir .*/run: another pipeline holds this run directory"):
            run_pipeline(cfg, "test.yaml")
        cfg_file = tmp_path / "stages.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        assert train.main(["--config", str(cfg_file)]) == 2  # the CLI: one error line, exit 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: pipeline {cfg_file}: run_dir ") and "another pipeline holds" in line
        assert other.record() == holder and other.held  # the holder's lock and record untouched
    finally:
        other.release()
    assert snapshot() == before
    assert not any(r["cached"] for r in run_pipeline(cfg, "test.yaml"))  # free again once the holder is gone


def test_every_stage_process_holds_the_run_dir_lock(tmp_path):
    """The lock's descriptor is inherited by each stage, so a stage left running by a killed pipeline keeps the run
    directory locked until it exits (no second pipeline clears its directory under it)."""
    probe = tmp_path / "probe.py"  # writes whether this process has the lock file open
    probe.write_text(
        "import os, sys\n"
        "fds = []\n"
        "for f in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        fds.append(os.readlink(os.path.join('/proc/self/fd', f)))\n"
        "    except OSError:  # the descriptor listdir itself used\n"
        "        pass\n"
        "open(sys.argv[1], 'w').write(str(any(p.endswith(sys.argv[2]) for p in fds)))\n"
    )
    cmd = f"python {probe} {{out}}/held.txt /{LOCK_FILE}"
    run_pipeline({"run_dir": str(tmp_path / "run"), "stages": [{"name": "a", "cmd": cmd}]}, "test.yaml")
    assert (tmp_path / "run" / "a" / "held.txt").read_text() == "True"


def test_a_malformed_stages_config_through_the_cli_writes_nothing(tmp_path, capsys):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": [{"name": "..", "cmd": "true"}]}))
    assert train.main(["--config", str(cfg_file)]) == 2
    assert "not a plain directory name" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # checked before the run directory (and its lock) is made
