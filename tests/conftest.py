import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
os.environ.setdefault("M2KD_QUICK", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pytest

TRAINING_FILES = {
    "test_ed.py",
    "test_host_reads.py",
    "test_icarl_form.py",
    "test_m2kd_plugin.py",
    "test_mechanisms.py",
    "test_options.py",
    "test_precision.py",
    "test_reliability.py",
    "test_snapshots.py",
    "test_speed_modes.py",
}
"""Files whose tests train models: CI runs them a second time under another
CPU kernel set (ATEN_CPU_CAPABILITY=avx2), as another machine would pick."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TRAINING_FILES:
            item.add_marker(pytest.mark.training)
