"""Test configuration: deterministic hypothesis profiles and seeded torch."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# examples/msd_colon_lib is imported by the example's tests as a top-level package
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# CI: derandomized (same examples every run), no deadline (first calls compile/warm caches).
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# dev: random exploration with more examples, for hunting bugs locally.
settings.register_profile(
    "dev", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, thread spinning costs more than it gains
    (the example's end-to-end tests use it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
