"""One autouse fixture for test modules of tiny PyTorch models: importing `one_thread` into a test module
runs that module single-threaded."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small inputs: with several intra-op threads torch spends most of its CPU time spinning (5x here
    on a shared machine), so the module runs single-threaded; the setting is restored after."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
