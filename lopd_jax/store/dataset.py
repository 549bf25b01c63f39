"""RolloutDataset: a directory of shard stores read as one sequence of samples (docs/design.md "Scale-out").

N precompute processes each write their own RolloutStore (one writer per store, its lock) inside one directory::

    DATASET/shard-00000-of-00008/   a RolloutStore; its manifest's ``shard`` is {"index": 0, "count": 8, ...}
    DATASET/shard-00001-of-00008/
    ...
    DATASET/.lopd_dataset.json    {"count": 8}: claimed by the first run (precompute.shards.claim)

Shard i holds a contiguous part of the work in the order one process would have written it (rollouts: whole
batches of the global prompt order; a split store: a contiguous range of its samples), so the shards concatenated
in index order are the samples of a single-process run, and sample ``i`` of the dataset is that run's sample ``i``.
No merge step: the trainer, the validator, the scorer and the Grain pipeline read the dataset through the reader
API of ``RolloutStore`` (``RolloutStore.open`` returns a RolloutDataset for a dataset directory).

Opening checks that the shards make one dataset: every shard of the count present, no index twice, one count, and
the same policy, tokenizer, chat template, sampling arguments, prompt file (content hash) and rollout arguments in
every manifest; shards that are scored (all or part) must name the same teacher and teacher arguments. Each refusal
is one StoreError naming the dataset and the shard.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lopd_jax.store.layout import MANIFEST, StoreError, child_spec, describe, kvstore_spec, local_dir, open_kvstore
from lopd_jax.store.reader import StoreReader

SHARD_DIR = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
# Manifest fields every shard must agree on (what the samples mean), and those of the teacher, among scored shards.
AGREE_KEYS = (
    "kind",
    "policy",
    "tokenizer",
    "chat_template",
    "sft_teacher",
    "sampling",
    "prompts",
    "rollout_args",
    "vocab_size",
    "behavior_logprobs",
    "topk",
    "behavior_topk",
    "topk_tail",
)
TEACHER_KEYS = ("teacher", "teacher_tokenizer", "teacher_args")


def shard_name(index: int, count: int) -> str:
    """The directory name of shard ``index`` of ``count`` inside a dataset."""
    return f"shard-{index:05d}-of-{count:05d}"


def shard_dirs(path: str | os.PathLike | dict) -> list[str]:
    """Names of the shard directories (``shard-XXXXX-of-YYYYY``) directly inside ``path``, sorted; [] if none."""
    spec = kvstore_spec(path)
    local = local_dir(spec)
    if local is not None:
        if not os.path.isdir(local):
            return []
        return sorted(n for n in os.listdir(local) if SHARD_DIR.match(n) and os.path.isdir(os.path.join(local, n)))
    names = set()
    for key in open_kvstore(spec).list().result():
        head, _, rest = bytes(key).decode("utf-8", "replace").partition("/")
        if rest == MANIFEST and SHARD_DIR.match(head):
            names.add(head)
    return sorted(names)


def is_dataset(path: str | os.PathLike | dict) -> bool:
    """True when ``path`` is a dataset directory (shard stores inside, no manifest of its own)."""
    return bool(shard_dirs(path))


def _diff(a: Any, b: Any, prefix: str) -> str | None:
    """Dotted name and both values of the first difference between two manifest values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if (d := _diff(a.get(key), b.get(key), f"{prefix}.{key}")) is not None:
                return d
        return None
    return None if a == b else f"{prefix} ({a!r} vs {b!r})"


class RolloutDataset:
    """Read-only view of the shards of a dataset as one sequence of samples (``RolloutStore``'s reader API)."""

    def __init__(self, path: str | os.PathLike | dict):
        self.spec = kvstore_spec(path)
        self.path = describe(self.spec)
        self.refresh()

    @classmethod
    def open(cls, path: str | os.PathLike | dict) -> RolloutDataset:
        """Open and check a dataset directory; StoreError naming the dataset and the shard at fault."""
        return cls(path)

    def refresh(self) -> None:
        """Re-read every shard (picks up samples committed since ``open``) and re-check that they agree."""
        names = shard_dirs(self.spec)
        if not names:
            raise StoreError(f"{self.path}: no shard-XXXXX-of-YYYYY stores inside (not a sharded dataset)")
        self.count = _check_names(self.path, names)
        self.names = [shard_name(i, self.count) for i in range(self.count)]
        self.stores = [StoreReader(child_spec(self.spec, n)) for n in self.names]
        _check_shards(self.path, self.names, [s.manifest for s in self.stores], self.count)
        self._index()

    def _index(self) -> None:
        sizes = np.array([len(s) for s in self.stores], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # shard k holds samples [starts[k], starts[k + 1])
        tokens = np.array([s.num_tokens for s in self.stores], np.int64)
        token_starts = np.concatenate([[0], np.cumsum(tokens)])
        self.offsets = np.concatenate(
            [s.offsets[:-1] + t for s, t in zip(self.stores, token_starts)] + [token_starts[-1:]]
        )
        self.prompt_lengths = np.concatenate([s.prompt_lengths for s in self.stores])
        self.prompt_index = np.concatenate([s.prompt_index for s in self.stores])
        self.topk, self.behavior_topk = self.stores[0].topk, self.stores[0].behavior_topk
        self.teacher_committed = int(sum(s.teacher_committed for s in self.stores))
        self._manifest = _merged_manifest(self.stores, self.count)

    def __getstate__(self) -> dict:  # pickled into Grain workers as its shards (each as location + manifest)
        return {"spec": self.spec, "count": self.count, "stores": self.stores}

    def __setstate__(self, state: dict) -> None:
        self.spec, self.path, self.count = state["spec"], describe(state["spec"]), state["count"]
        self.names, self.stores = [shard_name(i, self.count) for i in range(self.count)], state["stores"]
        self._index()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def manifest(self) -> dict:
        """The shards' common manifest: counts summed over shards (``teacher_committed``: scored samples), the
        teacher of the scored shards, and ``dataset`` = {"shards": N}."""
        return json.loads(json.dumps(self._manifest))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def incomplete(self) -> str | None:
        """The first shard whose samples are not all committed (its manifest's ``shard.expected``), or None."""
        for s in self.stores:
            if (problem := s.incomplete()) is not None:
                return problem
        return None

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, index inside the shard) of dataset sample ``i``."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range (dataset has {len(self)} committed samples)")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def sample(self, i: int) -> dict[str, Any]:
        """Dataset sample ``i`` (see ``RolloutStore.sample``)."""
        return self.samples([i])[0]

    def samples(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several samples, read shard by shard (each shard's reads issued together), returned in the given order."""
        where = [self.locate(i) for i in indices]
        out: list[dict[str, Any] | None] = [None] * len(where)
        for k in sorted({k for k, _ in where}):
            mine = [j for j, (kk, _) in enumerate(where) if kk == k]
            for j, s in zip(mine, self.stores[k].samples([where[j][1] for j in mine])):
                out[j] = s
        return out  # type: ignore[return-value]

    def read_array(self, name: str, lo: int, hi: int) -> np.ndarray:
        """``name``[lo:hi] of a per-token array over the dataset's concatenated token axis."""
        token_starts = self.offsets[self.starts]
        parts = []
        for k, s in enumerate(self.stores):
            a, b = max(lo, int(token_starts[k])), min(hi, int(token_starts[k + 1]))
            if a < b:
                parts.append(s.read_array(name, a - int(token_starts[k]), b - int(token_starts[k])))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _check_names(where: str, names: list[str]) -> int:
    """The one shard count of the directory names; StoreError naming a shard of another count or a missing one."""
    parsed = [(n, *map(int, SHARD_DIR.match(n).groups())) for n in names]
    count = parsed[0][2]
    for n, i, c in parsed:
        if c != count:
            raise StoreError(
                f"{where}: {n} is a shard of {c}, but {parsed[0][0]} is a shard of {count}: "
                "the shards of one dataset have one --num-shards"
            )
        if not i < c:
            raise StoreError(f"{where}: {n}: shard index {i} is not below its count {c}")
    present = {i for _, i, _ in parsed}
    missing = [i for i in range(count) if i not in present]
    if missing:
        raise StoreError(
            f"{where}: {shard_name(missing[0], count)} is missing ({len(missing)} of {count} shards "
            f"missing): run its precompute with --shard-index {missing[0]} --num-shards {count}"
        )
    return count


def _check_shards(where: str, names: list[str], manifests: list[dict], count: int) -> None:
    """Each shard's manifest names its own index and the count; all agree on what the samples mean."""
    seen: dict[int, str] = {}
    for name, m in zip(names, manifests):
        shard = m.get("shard")
        if not isinstance(shard, dict):
            raise StoreError(f"{where}: {name} has no 'shard' field in its manifest (a plain store copied in?)")
        if shard.get("count") != count:
            raise StoreError(f"{where}: {name}: its manifest says shard count {shard.get('count')}, not {count}")
        if shard.get("index") in seen:
            raise StoreError(f"{where}: duplicate shard index {shard.get('index')}: {seen[shard['index']]} and {name}")
        seen[shard.get("index")] = name
    _check_parts(where, names, [m["shard"] for m in manifests])
    for name, m in zip(names[1:], manifests[1:]):
        for key in AGREE_KEYS:
            if (d := _diff(manifests[0].get(key), m.get(key), key)) is not None:
                raise StoreError(f"{where}: {name} disagrees with {names[0]} on {d}")
    scored = [(n, m) for n, m in zip(names, manifests) if m.get("teacher_committed")]
    for name, m in scored[1:]:
        for key in TEACHER_KEYS:
            if (d := _diff(scored[0][1].get(key), m.get(key), key)) is not None:
                raise StoreError(f"{where}: {name} is scored by another teacher than {scored[0][0]}: {d}")


def _check_parts(where: str, names: list[str], records: list[dict]) -> None:
    """The shards' recorded parts of the work (rollouts: ``batches``, a split store: ``samples``, each [lo, hi))
    tile it in shard order: the first starts at 0, each starts where the one before ended, the last ends at the
    recorded total (``of``); no gap, nothing twice."""
    for key in ("batches", "samples"):
        parts = [r.get(key) for r in records]
        if all(p is None for p in parts):
            continue
        end = 0
        for name, part in zip(names, parts):
            if not (isinstance(part, list) and len(part) == 2 and part[0] == end and part[1] >= part[0]):
                raise StoreError(
                    f"{where}: {name} holds {key} {part} of the work, expected a part starting at {end}: the shards "
                    "leave a gap or overlap (made by runs with other arguments?); rerun that shard into a new dataset"
                )
            end = part[1]
        totals = {r.get("of") for r in records}
        if len(totals) > 1 or (None not in totals and end != totals.pop()):
            raise StoreError(
                f"{where}: the shards' {key} end at {end}, but they split a total of "
                f"{sorted(r.get('of') for r in records)} (shards of different runs?)"
            )


def _merged_manifest(stores: list[StoreReader], count: int) -> dict:
    """Shard 0's manifest with the counts of the whole dataset and the teacher fields of a scored shard."""
    manifests = [s.manifest for s in stores]
    m = dict(manifests[0])
    m.pop("shard", None)
    for key in [k for k in m if k.startswith("teacher") and k != "teacher_committed"]:
        del m[key]
    scored = [x for x in manifests if x.get("teacher_committed")]
    if scored:
        m.update({k: v for k, v in scored[0].items() if k.startswith("teacher")})
    for key in ("committed", "committed_tokens", "teacher_committed"):
        m[key] = int(sum(x[key] for x in manifests))
    m["dataset"] = {"shards": count}
    return m


__all__ = ["RolloutDataset", "is_dataset", "shard_dirs", "shard_name"]
