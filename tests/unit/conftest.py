"""Fixtures the unit modules share (their plain helpers live in tests/helpers/)."""

import numpy as np
import pytest
from helpers.losses import ROWS, V


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sequences():
    """Per-sequence numpy data: tokens, prompt length, teacher / behaviour log-probs of tokens[1:], old offsets."""
    rng = np.random.default_rng(1)
    out = []
    for row in ROWS:
        for p, n in row:
            out.append(
                dict(
                    tokens=rng.integers(0, V, n),
                    prompt=p,
                    teacher=rng.normal(-4.5, 1.5, n - 1).astype(np.float32),
                    behavior_noise=rng.normal(0, 0.1, n - 1).astype(np.float32),
                    # old = current + offset: +-0.35 pushes the ratio outside [0.8, 1.2] on those tokens
                    old_offset=(rng.choice([-0.35, 0.0, 0.35], n - 1)).astype(np.float32),
                )
            )
    return out
