"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one intra-op thread (pytest-xdist already runs 2 processes on 2
    cores; more threads per process oversubscribe them), then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
