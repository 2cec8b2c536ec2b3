"""Shared test setup: skip GPU-marked tests without a GPU; per-test seeded RNG."""
import zlib

import numpy as np
import pytest


def _has_gpu() -> bool:
  try:
    import jax
    return jax.default_backend() == "gpu"
  except Exception:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU (run with -m gpu on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test id: fresh inputs per case, reproducible per case."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
