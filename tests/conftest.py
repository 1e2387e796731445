"""Suite-wide settings."""
import torch

# The tests use tiny tensors: one intra-op thread is faster than two (no synchronisation), and on a
# shared 2-core machine extra threads oversubscribe the cores (measured: 500 tiny Adam steps took
# ~1.5 s on one thread, ~30 s on two under load).
torch.set_num_threads(1)
