import os
import sys

import torch

# Tests import the flat modules from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tiny tensors: one thread is faster than two fighting over them.
torch.set_num_threads(1)
