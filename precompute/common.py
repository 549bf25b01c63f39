"""Helpers shared by the precompute command lines: model checks, manifests, progress, test hooks.

Prompt files, tokenizers and stop ids come from ``lopd_jax.data.prompts`` (the one encoder the trainer uses too).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lopd_jax.data.prompts import PromptError

# Test hook (documented, used by tests/integration/test_precompute_cli.py): when set to N, a tool SIGKILLs itself right
# after its N-th commit, so a test can kill it at a deterministic point and check that a rerun resumes exactly.
KILL_ENV = "LOPD_TEST_KILL_AFTER_BATCHES"
NO_AUTO_FLUSH = 1 << 62  # the tools commit at batch boundaries only, so a resumed run re-cuts the same batches


class PrecomputeError(ValueError):
    """Bad input or a store that cannot be continued; the message names the file, line, store or field."""


# ------------------------------------------------------------------------------------------------ inputs


def add_key_args(p: Any) -> None:
    """``--prompt-key`` / ``--answer-key``: the columns of a prompt set (``lopd_jax.data.prompts.map_row``)."""
    p.add_argument("--prompt-key", default=None,
                   help="column of the prompt: a string or a chat messages list; dotted for a nested field "
                   "(default: prompt or messages)")  # fmt: skip
    p.add_argument(
        "--answer-key",
        default=None,
        help="column of the reference answer (default: answer, else verl's reward_model.ground_truth)",
    )


def check_model_dir(model_dir: str | os.PathLike, flag: str) -> None:
    """Refuse, before any store is touched, a model the tools cannot run: no readable config.json, not a Qwen3
    causal LM (config.json ``model_type`` / ``architectures``; lopd_jax trains Qwen3 dense and MoE), or weights
    that cannot hold that config (``hf.check_checkpoint``: a missing shard or tensor, a wrong shape, a garbled
    safetensors header)."""
    from lopd_jax.models import hf

    path = Path(model_dir) / hf.CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrecomputeError(f"{flag} {model_dir}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrecomputeError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PrecomputeError(f"{path}: expected a JSON object")
    supported = sorted(hf._ARCH.values())
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in hf._ARCH or any(a not in supported for a in archs):
        raise PrecomputeError(
            f"{flag} {model_dir}: config.json has model_type {cfg.get('model_type')!r}, architectures {archs}; "
            f"the precompute tools run {supported} (model_type {sorted(hf._ARCH)}) only"
        )
    try:
        hf.check_checkpoint(str(model_dir), hf.config_from_hf(cfg, str(path)))
    except (hf.CheckpointError, ValueError) as e:
        raise PrecomputeError(f"{flag} {model_dir}: {e}") from None


def max_positions(model_dir: str | os.PathLike) -> int:
    """The model's ``max_position_embeddings`` (config.json; the Qwen3 default when absent, as ``hf`` reads it):
    rotary positions past it are outside what the model was trained on."""
    from lopd_jax.models import hf

    cfg = json.loads((Path(model_dir) / hf.CONFIG_FILE).read_text(encoding="utf-8"))
    return int(cfg.get("max_position_embeddings", 40960))


def check_engine(engine: str) -> None:
    """Refuse ``--engine vllm`` where vLLM is not installed, before any store is created."""
    import importlib.util

    if engine == "vllm" and "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
        raise PrecomputeError("--engine vllm: vllm is not installed here (it needs NVIDIA GPUs); use --engine jax")


# ------------------------------------------------------------------------------------------------ manifest


def versions(engine: str) -> dict[str, str]:
    """Versions of the packages whose numerics end up in the store."""
    names = ["lopd_jax", "jax", "jaxlib", "transformers", "tokenizers", "tensorstore"] + (
        ["vllm", "torch"] if engine == "vllm" else []
    )
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def first_difference(stored: dict, wanted: dict, prefix: str = "") -> str | None:
    """Dotted name of the first field whose value differs between two (nested) dicts, or None."""
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (sub := first_difference(a, b, f"{prefix}{key}.")) is not None:
                return sub
        elif a != b:
            return f"{prefix}{key} (store: {a!r}, this run: {b!r})"
    return None


def open_or_create(out: str, fields: dict, create: Any, refusal: str = "the store was made with different arguments"):
    """A writer for ``out``: the existing store when its ``fields`` equal this run's (a resume), else a new one
    from ``create()``. An EMPTY store (nothing committed) made by the same kind of run with other arguments is
    what a failed run leaves: it is replaced with a warning rather than blocking the corrected rerun. A store with
    committed samples and other arguments is refused (PrecomputeError naming the first differing field)."""
    from lopd_jax.store import RolloutStore
    from lopd_jax.store.layout import has_manifest, kvstore_spec

    if not has_manifest(kvstore_spec(out)):
        return create()
    writer = RolloutStore.open_for_append(out, flush_tokens=NO_AUTO_FLUSH)
    stored = writer.manifest
    diff = first_difference({k: stored.get(k) for k in fields}, fields)
    if diff is None:
        return writer
    if writer.committed == 0 and writer.teacher_committed == 0 and stored.get("kind") == fields.get("kind"):
        print(f"warning: {out}: replacing the empty store a failed run left ({diff})", file=sys.stderr, flush=True)
        writer.discard_empty()
        return create()
    writer.release()
    raise PrecomputeError(f"{out}: {refusal}: {diff}; use a new --out")


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """A tqdm bar over samples that shows tokens/s, plus the final summary line."""

    def __init__(self, total: int, initial: int, desc: str):
        self.start, self.tokens, self.samples = time.perf_counter(), 0, 0
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True)

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        self.bar.update(samples)
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f} tok/s")

    def summary(self, tool: str, skipped: int = 0, **extra: Any) -> str:
        self.bar.close()
        secs = time.perf_counter() - self.start
        fields = {"samples": self.samples, "tokens": self.tokens, "skipped": skipped, "seconds": round(secs, 2)}
        fields["tokens_per_s"] = round(self.tokens / max(secs, 1e-9), 1)
        line = f"{tool}: " + " ".join(f"{k}={v}" for k, v in {**fields, **extra}.items())
        print(line, flush=True)
        return line


def maybe_kill(commits: int) -> None:
    """Test hook: SIGKILL this process after ``$LOPD_TEST_KILL_AFTER_BATCHES`` commits (see KILL_ENV)."""
    limit = os.environ.get(KILL_ENV)
    if limit and commits >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def run_cli(parse_args: Any, run: Any, argv: list[str] | None = None) -> int:
    """The tools' shared ``main``: parse, run, and report an expected failure (bad input, inconsistent store or
    teacher) as one ``error:`` line and exit status 2 instead of a traceback."""
    from lopd_jax.store import StoreError
    from lopd_jax.store.provenance import ProvenanceError

    args = parse_args(argv)
    try:
        run(args)
    except (PrecomputeError, PromptError, StoreError, ProvenanceError) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress line first: the error is its own line
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
