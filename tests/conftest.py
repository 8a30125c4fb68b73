"""Shared test fixtures."""

import pytest
import torch
from _tiny_lm import tiny_lm_dir  # noqa: F401  (the LM tests' tiny model folder)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread: tiny convolutions and models run far faster on
    one thread, above all on a shared 2-core CPU. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
