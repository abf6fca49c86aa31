import os
import tempfile

import pytest
import torch

# Converted arrays go to a throw-away cache, never the user's ~/.cache (subprocesses that the
# tests start inherit it).
_DATA_CACHE = tempfile.TemporaryDirectory(prefix="ddpmkit-test-data-cache-")
os.environ["DDPMKIT_DATA_CACHE"] = _DATA_CACHE.name


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests run many tiny ops; on a 2-core machine that is busy with anything else,
    # multi-threaded tiny ops stall for milliseconds each. One thread is faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
