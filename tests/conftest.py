"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture()
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine run faster without thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
