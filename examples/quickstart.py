"""Quick start: the MRU scan and the MRU layer in a few lines (runs on CPU in about a second)."""
import torch

import matrec

# H_t = H_{t-1} @ M_t for every t, by a parallel prefix scan (forward and backward)
M = torch.linalg.matrix_exp(0.1 * torch.randn(2, 100, 8, 8))  # [batch, T, d, d]
H = matrec.mru_scan(M)  # [2, 100, 8, 8]; backend="auto"
loop = matrec.mru_scan(M, backend="sequential")  # the plain loop, for comparison
print("scan:", tuple(H.shape), "matches the loop:", torch.allclose(H, loop, rtol=1e-4, atol=1e-4))

# build input states from raw elements: exactly the identity at zero, det 1 for "ldu"
x = 0.1 * torch.randn(2, 100, matrec.state_matrix_numel("ldu", 8))
print("det(M) =", torch.linalg.det(matrec.state_matrix("ldu", x, 8))[0, :3].tolist())

# the layer: [B, T, E] -> [B, T, E], plus the state to continue the sequence
mru = matrec.MRU(64, num_heads=4)  # order d = 4 per head, state_size = 64
x = torch.randn(2, 50, 64)
y, state = mru(x)
y1, s1 = mru(x[:, :20])
y2, s2 = mru(x[:, 20:], s1)  # streaming in pieces == whole
streamed = torch.cat([y1, y2], 1)
print("layer:", tuple(y.shape), tuple(state.shape), "stream == whole:", torch.allclose(streamed, y, atol=1e-5))
