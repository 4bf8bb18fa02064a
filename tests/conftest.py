import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
os.environ.setdefault("M2KD_QUICK", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", category=DeprecationWarning)
