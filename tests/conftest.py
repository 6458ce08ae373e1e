"""Test set-up shared by the whole suite.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen when `triton.jit` decorates a kernel, so the variable must be set before anything imports
hift_rt.kernels; on a GPU machine the kernels compile for real and CPU tensors take the torch path.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # A run in which nothing passed (everything skipped or deselected) is a failure for us.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == 0 and reporter is not None and not reporter.stats.get("passed"):
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
