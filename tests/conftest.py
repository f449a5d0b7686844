"""Tiny networks run faster on one thread, and pytest-xdist already uses every core."""

import torch

torch.set_num_threads(1)
