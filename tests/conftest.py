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


@pytest.fixture(scope="module")
def sl():
    """benchmarks/serve_load.py as a module: the server tests start the server with its
    ``Server`` and send requests with its ``call``."""
    from _helpers import loaded_benchmark

    with loaded_benchmark("serve_load.py") as module:
        yield module


def _inductor_follows_a_forced_cpu_capability() -> None:
    """With ``ATEN_CPU_CAPABILITY`` forced (the suite is checked under ``avx2`` and
    ``default``), ATen's headers are built for that capability while inductor still picks
    the widest SIMD the CPU has, and its C++ fails to compile (``'at::vec' has not been
    declared``). Make inductor's vector width follow the forced capability."""
    import os

    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    width = {"default": 1, "avx2": 256, "avx512": 512}.get(forced)
    if width is not None:
        import torch._inductor.config as inductor

        inductor.cpp.simdlen = width


_inductor_follows_a_forced_cpu_capability()
