"""The OPD loss tests' packed sequences and torch references (tests/unit/test_losses.py, test_grouped_matmul.py);
the ``sequences`` fixture that draws them lives in tests/unit/conftest.py."""

from __future__ import annotations

import jax
import numpy as np
import torch

from lopd_jax.data.loader import Batch

V = 128  # the vocabulary of the tiny model the sequences are drawn for
# (prompt length, total length) per sequence, packed into rows of T = 16 tokens (inputs = seq[:-1]).
ROWS = [[(3, 9), (2, 8)], [(4, 13)], [(2, 5), (3, 6), (1, 4)]]
T = 16


def torch_seq_logprobs(model, seqs) -> list[torch.Tensor]:
    """log p(tokens[1:] | prefix) per sequence, each run alone through the HF model (no packing)."""
    out = []
    for s in seqs:
        ids = torch.tensor(s["tokens"][None], dtype=torch.long)
        logits = model(input_ids=ids[:, :-1]).logits.float()
        out.append(torch.log_softmax(logits, -1)[0].gather(-1, ids[0, 1:, None])[:, 0])
    return out


def pack(seqs, per_seq: list[np.ndarray] | None = None) -> Batch | np.ndarray:
    """Pack sequences into ROWS (shifted convention); with per_seq, pack those [n-1] arrays instead."""
    fields = {k: np.zeros((len(ROWS), T), np.float32) for k in ("loss_mask", "teacher", "behavior", "x")}
    ints = {k: np.zeros((len(ROWS), T), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    i = 0
    for r, row in enumerate(ROWS):
        t0 = 0
        for seg, (p, n) in enumerate(row, start=1):
            s, sl = seqs[i], slice(t0, t0 + n - 1)
            ints["inputs"][r, sl], ints["targets"][r, sl] = s["tokens"][:-1], s["tokens"][1:]
            ints["positions"][r, sl], ints["segment_ids"][r, sl] = np.arange(n - 1), seg
            resp = (np.arange(1, n) >= p).astype(np.float32)  # targets[t] = tokens[t + 1] is a response token
            fields["loss_mask"][r, sl] = resp
            fields["teacher"][r, sl] = s["teacher"] * resp
            if per_seq is not None:
                fields["x"][r, sl] = per_seq[i]
            t0 += n - 1
            i += 1
    if per_seq is not None:
        return fields["x"]
    return Batch(
        inputs=ints["inputs"],
        targets=ints["targets"],
        positions=ints["positions"],
        segment_ids=ints["segment_ids"],
        loss_mask=fields["loss_mask"],
        teacher_logprobs=fields["teacher"],
        behavior_logprobs=fields["behavior"],
    )


def torch_opd_loss(model, seqs, normalization: str, old_offsets: bool, eps=(0.2, 0.2)):
    """The reference objective (docs/design.md) written directly: PPO-clip with A = teacher - old, per-sequence token
    means summed and divided by the number of sequences (sample_mean), or one mean over all response tokens
    (token_mean)."""
    per_seq, clipped, count = [], 0.0, 0.0
    for s, lp in zip(seqs, torch_seq_logprobs(model, seqs)):
        mask = torch.tensor(np.arange(1, len(s["tokens"])) >= s["prompt"], dtype=torch.float32)
        old = lp.detach() + (torch.tensor(s["old_offset"]) if old_offsets else 0.0)
        adv = torch.tensor(s["teacher"]) - old
        ratio = torch.exp(lp - old)
        surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps[0], 1 + eps[1]) * adv)
        per_seq.append((-surr * mask, mask))
        was_clipped = (torch.clamp(ratio, 1 - eps[0], 1 + eps[1]) * adv < ratio * adv).float()
        clipped += float((was_clipped * mask).sum())
        count += float(mask.sum())
    if normalization == "sample_mean":
        loss = sum(x.sum() / m.sum() for x, m in per_seq) / len(per_seq)
    else:
        loss = sum(x.sum() for x, _ in per_seq) / sum(m.sum() for _, m in per_seq)
    return loss, clipped / count


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_tree_close(got, want, tol):
    errs = jax.tree.map(rel_err, got, want)
    worst = max(jax.tree.leaves(errs))
    assert worst <= tol, errs
