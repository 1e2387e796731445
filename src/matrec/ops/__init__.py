"""Functions on tensors: scans, orthogonal maps, state-matrix constructions, fused recurrences."""
