"""Multi-stage runs (the demo): each stage is one command line, cached by its inputs.

A config with a ``stages`` list is run here instead of training directly::

    run_dir: runs/demo
    stages:
      - name: teacher
        cmd: python -m lopd_jax.train --config configs/demo/teacher.yaml logging.run_dir={out}
      - name: sft_data
        cmd: python -m precompute.rollouts --policy {teacher}/hf --prompts {task}/sft.jsonl --out {out}/store
        group: data            # optional: rows of the report are grouped by this
        result: eval.json      # optional: a JSON file in the stage dir whose numbers go into the report
        foreach: {seed: [0, 1, 2]}   # optional: one stage per value, {seed} substituted

Placeholders: ``{run_dir}``, ``{out}`` (this stage's directory), ``{NAME}`` (the directory of stage NAME; inside a
``foreach`` stage it resolves to the instance with the same loop values), and the loop variables.

A stage's cache key hashes its resolved command, the content of every file outside the run directory that its
command names, the keys of the stages it references and the source of ``lopd_jax`` and ``precompute``. A stage
whose directory holds a ``stage.json`` with the same key is skipped, so a second run only redoes what changed.

One pipeline runs in a run directory at a time (configs may share one, as the demo and its comparison do): it holds
an exclusive lock on ``run_dir/.lopd_pipeline.lock`` while it runs, and a second is refused, naming the holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lopd_jax.atomic import write_atomic
from lopd_jax.store.lock import FileLock, LockError

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STAGE_KEYS = {"name", "cmd", "group", "result", "foreach"}
_STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")  # one path component: never "..", "/" or absolute
# Files the pipeline itself writes into a stage directory: only a directory holding one of them is ever cleared.
_OWN_FILES = ("stage.json", "stage.log")


LOCK_FILE = ".lopd_pipeline.lock"  # lopd_jax.store.lock.FileLock: flock, taken over from a dead holder, never deleted


class PipelineError(ValueError):
    """A malformed stages config or a failed stage."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    base: str  # the name in the config (differs from ``name`` for foreach instances)
    cmd: str  # with placeholders still in it
    group: str | None = None
    result: str | None = None
    loop: tuple[tuple[str, Any], ...] = ()  # the foreach values of this instance


def expand_stages(raw: list[dict], source: str) -> list[Stage]:
    """Validates the ``stages`` list and expands ``foreach`` into one Stage per value combination."""
    if not isinstance(raw, list) or not raw:
        raise PipelineError(f"{source}: 'stages' must be a non-empty list")
    stages: list[Stage] = []
    for i, entry in enumerate(raw):
        where = f"{source}: stages[{i}]"
        if not isinstance(entry, dict) or not {"name", "cmd"} <= entry.keys():
            raise PipelineError(f"{where} needs 'name' and 'cmd'")
        unknown = set(entry) - _STAGE_KEYS
        if unknown:
            raise PipelineError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}")
        loops = entry.get("foreach") or {}
        names, values = list(loops), [list(v) for v in loops.values()]
        for combo in itertools.product(*values):
            loop = tuple(zip(names, combo))
            suffix = "".join(f"-{k}{v}" for k, v in loop)
            name = entry["name"]
            stages.append(Stage(name + suffix, name, str(entry["cmd"]), entry.get("group"), entry.get("result"), loop))
    bad = [s.name for s in stages if not _STAGE_NAME.fullmatch(s.name)]
    if bad:
        raise PipelineError(f"{source}: stage name {bad[0]!r} is not a plain directory name (letters, digits, _.=-)")
    seen = [s.name for s in stages]
    dup = {n for n in seen if seen.count(n) > 1}
    if dup:
        raise PipelineError(f"{source}: duplicate stage names {sorted(dup)}")
    return stages


def _code_digest() -> str:
    """Hash of the library and precompute sources: a code change invalidates every cached stage."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in ("lopd_jax", "precompute"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _dir_digest(path: Path) -> str:
    """An input directory (a model, a store, a tokenizer) by its files' names, sizes and mtimes: a stat each,
    never the bytes of multi-GB weights; any rewritten file changes it."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_marker(marker: Path) -> dict | None:
    """A stage's ``stage.json``, or None when missing or unreadable (the stage then simply runs again)."""
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _read_result(stage: Stage, file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"stage {stage.name!r}: result file {file} is not readable JSON ({e})") from None


class Pipeline:
    """Resolves placeholders, computes cache keys and runs stages in order."""

    def __init__(self, stages: list[Stage], run_dir: str | os.PathLike, *, keep_fds: tuple[int, ...] = ()):
        self.stages = stages
        self.keep_fds = keep_fds  # handed to every stage process: the run-directory lock lives as long as a stage
        self.run_dir = Path(run_dir)
        self.by_name = {s.name: s for s in stages}
        self.keys: dict[str, str] = {}
        self._code = _code_digest()

    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / stage.name

    def _resolve_ref(self, ref: str, stage: Stage) -> Stage | None:
        """Finds stage ``ref`` (plain, or the foreach instance sharing this stage's loop values)."""
        if ref in self.by_name:
            return self.by_name[ref]
        loop = dict(stage.loop)
        for s in self.stages:
            if s.base == ref and s.loop and all(loop.get(k) == v for k, v in s.loop):
                return s
        return None

    def resolve(self, stage: Stage) -> tuple[str, list[Stage]]:
        """The command with placeholders filled in, and the stages it depends on."""
        loop, deps = dict(stage.loop), []

        def fill(m: re.Match) -> str:
            key = m.group(1)
            if key == "run_dir":
                return str(self.run_dir)
            if key == "out":
                return str(self.stage_dir(stage))
            if key in loop:
                return str(loop[key])
            ref = self._resolve_ref(key, stage)
            if ref is None:
                raise PipelineError(f"stage {stage.name!r}: unknown placeholder {{{key}}}")
            if ref.name not in self.keys:
                raise PipelineError(f"stage {stage.name!r} refers to {ref.name!r}, which runs later")
            deps.append(ref)
            return str(self.stage_dir(ref))

        return _PLACEHOLDER.sub(fill, stage.cmd), deps

    def cache_key(self, cmd: str, deps: list[Stage]) -> str:
        h = hashlib.sha256(cmd.encode())
        h.update(self._code.encode())
        for dep in deps:
            h.update(self.keys[dep.name].encode())
        run_dir = self.run_dir.resolve()
        for token in shlex.split(cmd):
            path = token.split("=", 1)[-1]
            # Inputs such as config files count by content; outputs of stages (under run_dir) count by their key.
            if not path or run_dir in Path(path).resolve().parents or Path(path).resolve() == run_dir:
                continue
            if os.path.isfile(path):
                h.update(Path(path).read_bytes())
            elif os.path.isdir(path) and Path(path).resolve() not in run_dir.parents:  # never a dir holding outputs
                h.update(_dir_digest(Path(path)).encode())
        return h.hexdigest()[:16]

    def run(self, *, force: bool = False) -> list[dict]:
        """Runs every stage whose key changed; returns one record per stage for the report."""
        records = []
        for stage in self.stages:
            cmd, deps = self.resolve(stage)
            key = self.keys[stage.name] = self.cache_key(cmd, deps)
            out = self.stage_dir(stage)
            marker = _read_marker(out / "stage.json")
            if not force and marker is not None and marker.get("key") == key:
                rec = marker | {"cached": True}
            else:
                rec = self._run_one(stage, cmd, key, out)
            if stage.result and (out / stage.result).exists():
                rec["result"] = _read_result(stage, out / stage.result)
            records.append(rec | {"name": stage.name, "group": stage.group, "loop": dict(stage.loop)})
        return records

    def _clear(self, stage: Stage, out: Path) -> None:
        """Removes a stage directory of another key (or a failed run), as tools refuse to write over outputs;
        a directory the pipeline did not make (no stage.json / stage.log) is a user's and is never removed."""
        if not out.exists():
            return
        if not out.is_dir() or not any((out / f).exists() for f in _OWN_FILES):
            raise PipelineError(
                f"stage {stage.name!r}: {out} exists but was not made by this pipeline (no {' / '.join(_OWN_FILES)}); "
                "move it away or pick another run_dir"
            )
        shutil.rmtree(out)

    def _run_one(self, stage: Stage, cmd: str, key: str, out: Path) -> dict:
        self._clear(stage, out)
        out.mkdir(parents=True, exist_ok=True)
        argv = shlex.split(cmd)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the same interpreter (and venv) as the pipeline
        print(f"\n=== stage {stage.name}: {cmd}", flush=True)
        t0 = time.perf_counter()
        with open(out / "stage.log", "wb") as log:
            try:
                proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0, pass_fds=self.keep_fds
                )
            except OSError as e:
                raise PipelineError(f"stage {stage.name!r}: cannot start {argv[0] if argv else cmd!r}: {e}") from None
            # tee raw bytes as they come, not lines: progress bars redraw with '\r' and would otherwise show
            # only when they finish, leaving a stage silent for minutes
            while chunk := os.read(proc.stdout.fileno(), 65536):
                _relay(chunk)
                log.write(chunk)
            code = proc.wait()
        seconds = time.perf_counter() - t0
        if code != 0:
            raise PipelineError(f"stage {stage.name!r} failed (exit {code}); log: {out / 'stage.log'}")
        rec = {"key": key, "cmd": cmd, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_atomic(out / "stage.json", json.dumps(rec, indent=1))  # the marker appears once the stage succeeded
        return rec | {"cached": False}


def _relay(chunk: bytes) -> None:
    """Writes a child's raw output to our stdout (a text stream without a byte buffer, as under pytest, too)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
    else:
        sys.stdout.flush()
        buffer.write(chunk)
        buffer.flush()


def resolve_run_dir(raw_config: dict, source: str, run_dir: str | None = None) -> str:
    """The run directory of a stages config: ``run_dir`` given, else the config's, else runs/<config stem>."""
    return run_dir or raw_config.get("run_dir") or os.path.join("runs", Path(source).stem)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[FileLock]:
    """Holds ``run_dir/LOCK_FILE`` (created with the directory) for one pipeline: two pipelines in one run
    directory would clear and rewrite each other's stage directories. PipelineError naming the holder if taken."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        lock = FileLock.acquire(Path(run_dir, LOCK_FILE), f"run_dir {run_dir}", "pipeline", "this run directory")
    except OSError as e:
        raise PipelineError(f"run_dir {run_dir}: cannot write to it ({e.strerror or e})") from None
    except LockError as e:
        raise PipelineError(str(e)) from None
    try:
        yield lock
    finally:
        lock.release()


def run_pipeline(
    raw_config: dict,
    source: str,
    *,
    run_dir: str | None = None,
    force: bool = False,
    then: Callable[[list[dict]], Any] | None = None,
) -> list[dict]:
    """Entry point used by ``python -m lopd_jax.train`` when the config lists ``stages``. The config is checked
    before anything is written; the run then holds ``run_dir_lock``, whose descriptor every stage process inherits
    (a stage left running by a killed pipeline keeps the run directory locked until it exits). ``then(records)``
    runs under the same lock (the report, which reads the stages' outputs)."""
    stages = expand_stages(raw_config.get("stages"), source)
    run_dir = resolve_run_dir(raw_config, source, run_dir)
    with run_dir_lock(run_dir) as lock:
        records = Pipeline(stages, run_dir, keep_fds=(lock.fileno(),)).run(force=force)
        write_atomic(Path(run_dir, "pipeline.json"), json.dumps(records, indent=1))
        if then is not None:
            then(records)
    return records
