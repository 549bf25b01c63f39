"""RolloutStore: the entry point every caller starts from (open a store or a dataset, create, open_for_append)."""

from __future__ import annotations

import os

from lopd_jax.store.dataset import RolloutDataset, is_dataset
from lopd_jax.store.layout import (
    has_manifest,
    kvstore_spec,
)
from lopd_jax.store.reader import StoreReader
from lopd_jax.store.writer import RolloutWriter


class RolloutStore(StoreReader):
    """One store's committed samples (``StoreReader``), and the factories every caller starts from."""

    @classmethod
    def open(cls, path: str | os.PathLike | dict) -> RolloutStore | RolloutDataset:
        """Open a store for reading; StoreError naming the path for a missing manifest or an inconsistent store.

        A dataset directory of shard stores (``precompute`` with ``--num-shards``) opens as a
        ``lopd_jax.store.dataset.RolloutDataset``: the same reader API over all its shards, in shard order."""
        spec = kvstore_spec(path)
        if not has_manifest(spec) and is_dataset(spec):
            return RolloutDataset(spec)
        return cls(spec)

    @classmethod
    def create(cls, path: str | os.PathLike | dict, manifest: dict, topk: int = 0, **kwargs) -> RolloutWriter:
        """A writer for a new, empty store at ``path`` (see ``lopd_jax.store.writer.RolloutWriter.create``)."""
        return RolloutWriter.create(path, manifest, topk=topk, **kwargs)

    @classmethod
    def open_for_append(cls, path: str | os.PathLike | dict, **kwargs) -> RolloutWriter:
        """A writer that continues an existing store where its last commit ended."""
        return RolloutWriter.open(path, **kwargs)
