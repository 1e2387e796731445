"""Triton kernel bodies of the chunked MRU scan (forward docs/design.md §2.1, backward §2.2).

The bodies are plain functions, not decorated with ``@triton.jit``: ``matrec.ops.mru_scan.triton`` wraps
each one itself, compiled for a GPU or interpreted for CPU tensors, whatever ``TRITON_INTERPRET`` said
when this module was imported. They call only ``tl.*`` builtins (``tl.full``, never ``tl.zeros``):
Triton's interpreter runs a body's callees as they are, and the ``@jit`` helpers of
``triton.language.standard`` (``zeros``, ``sum``, ...) were compiled-or-interpreted once, when triton
was first imported, so they fail in an interpreted body if triton came in without TRITON_INTERPRET.
Scalar conditions in load masks are broadcast to a block first (``r[:, None] * 0 + t > 0``): the
interpreter mistypes ``block_mask & scalar_mask``.

Layout: ``M``, ``H``, ``G`` (= dL/dH), ``dM`` are contiguous ``[N, T, DIM, DIM]`` in their I/O dtype;
``H0``/``dH0`` are ``[N, DIM, DIM]``. Every matrix is held in registers as a ``[D, D]`` fp32 block,
``D`` = DIM rounded up to a power of two >= 16 (what ``tl.dot`` needs); the padding is zero, which
products keep zero, so the top-left ``DIM x DIM`` block is exact. Chunk buffers (``P``, ``S``, ``U``,
``L``, ``BC``) are fp32 ``[N, n_chunks, D, D]``. Products use ``input_precision="ieee"``: true fp32
FMAs, never TF32, so the kernel matches the float32 reference.

A sequence is cut into chunks of ``CHUNK`` steps; program ``(n, c)`` owns chunk ``c`` of sequence ``n``.
"""
import triton.language as tl


def mru_fwd_chunk_total(M, P, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr):
    """Phase 1 forward: ``P[n, c] = M_s @ ... @ M_{e-1}``, the product over chunk ``c = [s, e)``."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, D)
    inside = (r[:, None] < DIM) & (r[None, :] < DIM)  # [D, D] the real (unpadded) block
    offs = r[:, None] * DIM + r[None, :]
    pad = r[:, None] * D + r[None, :]
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    seq = M + n * T * DIM * DIM
    acc = tl.where((r[:, None] == r[None, :]) & inside, 1.0, 0.0)  # [D, D] identity
    for t in range(start, end):
        m = tl.load(seq + t * DIM * DIM + offs, mask=inside, other=0.0).to(tl.float32)
        acc = tl.dot(acc, m, input_precision="ieee")
    tl.store(P + (n * n_chunks + c) * D * D + pad, acc)


def mru_fwd_chunk_carry(P, S, H0, n_chunks, DIM: tl.constexpr, D: tl.constexpr,
                        HAS_H0: tl.constexpr):
    """Phase 2 forward, one program per sequence: ``S[n, c] = H0 @ P[n, 0] @ ... @ P[n, c-1]``.

    ``S[n, c]`` is the state entering chunk ``c`` (an exclusive scan over the chunk totals).
    """
    n = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, D)
    inside = (r[:, None] < DIM) & (r[None, :] < DIM)
    pad = r[:, None] * D + r[None, :]
    if HAS_H0:
        carry = tl.load(H0 + n * DIM * DIM + r[:, None] * DIM + r[None, :], mask=inside,
                        other=0.0).to(tl.float32)
    else:
        carry = tl.where((r[:, None] == r[None, :]) & inside, 1.0, 0.0)
    for c in range(0, n_chunks):
        base = (n * n_chunks + c) * D * D
        tl.store(S + base + pad, carry)
        carry = tl.dot(carry, tl.load(P + base + pad), input_precision="ieee")


def mru_fwd_apply(M, H, S, H0, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr,
                  CARRY: tl.constexpr):
    """Phase 3 forward: ``H_t = H_{t-1} @ M_t`` over chunk ``c``, starting from its entering state.

    ``CARRY``: 0 = identity, 1 = ``H0[n]`` (single chunk, phases 1-2 skipped), 2 = ``S[n, c]``.
    """
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, D)
    inside = (r[:, None] < DIM) & (r[None, :] < DIM)
    offs = r[:, None] * DIM + r[None, :]
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    if CARRY == 2:
        h = tl.load(S + (n * n_chunks + c) * D * D + r[:, None] * D + r[None, :])
    elif CARRY == 1:
        h = tl.load(H0 + n * DIM * DIM + offs, mask=inside, other=0.0).to(tl.float32)
    else:
        h = tl.where((r[:, None] == r[None, :]) & inside, 1.0, 0.0)
    m_seq = M + n * T * DIM * DIM
    h_seq = H + n * T * DIM * DIM
    for t in range(start, end):
        m = tl.load(m_seq + t * DIM * DIM + offs, mask=inside, other=0.0).to(tl.float32)
        h = tl.dot(h, m, input_precision="ieee")
        tl.store(h_seq + t * DIM * DIM + offs, h.to(H.dtype.element_ty), mask=inside)


def mru_bwd_chunk_affine(M, G, U, L, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr):
    """Phase 1 backward: the affine map of chunk ``c = [s, e)`` from ``B_e`` to ``B_s``.

    ``B_s = L + B_e @ U`` with ``L`` = the chunk's own adjoint at ``s`` (``B_e = 0``) and
    ``U = M_e^T @ M_{e-1}^T @ ... @ M_{s+1}^T``. Walks the chunk backwards.
    """
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, D)
    inside = (r[:, None] < DIM) & (r[None, :] < DIM)
    offs = r[:, None] * DIM + r[None, :]
    offs_t = r[None, :] * DIM + r[:, None]  # reads the transpose
    pad = r[:, None] * D + r[None, :]
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    m_seq = M + n * T * DIM * DIM
    g_seq = G + n * T * DIM * DIM
    # M_e^T (zero past the end: nothing flows back from beyond T)
    u = tl.load(m_seq + end * DIM * DIM + offs_t, mask=inside & (r[:, None] * 0 + end < T),
                other=0.0).to(tl.float32)
    l = tl.load(g_seq + (end - 1) * DIM * DIM + offs, mask=inside, other=0.0).to(tl.float32)
    for k in range(1, end - start):
        t = end - k  # (l, u) describe B_t; step to B_{t-1} = G_{t-1} + B_t @ M_t^T
        m_t = tl.load(m_seq + t * DIM * DIM + offs_t, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_seq + (t - 1) * DIM * DIM + offs, mask=inside, other=0.0).to(tl.float32)
        l = g + tl.dot(l, m_t, input_precision="ieee")
        u = tl.dot(u, m_t, input_precision="ieee")
    base = (n * n_chunks + c) * D * D
    tl.store(U + base + pad, u)
    tl.store(L + base + pad, l)


def mru_bwd_chunk_carry(U, L, BC, n_chunks, D: tl.constexpr):
    """Phase 2 backward, one program per sequence, last chunk first: ``BC[n, c]`` = ``B`` at the first
    step after chunk ``c`` (zero for the last chunk), from ``B_s(c) = L[c] + BC[c] @ U[c]``."""
    n = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, D)
    pad = r[:, None] * D + r[None, :]
    carry = tl.full((D, D), 0.0, tl.float32)
    for k in range(0, n_chunks):
        base = (n * n_chunks + (n_chunks - 1 - k)) * D * D
        tl.store(BC + base + pad, carry)
        carry = tl.load(L + base + pad) + tl.dot(carry, tl.load(U + base + pad),
                                                 input_precision="ieee")


def mru_bwd_apply(M, H, G, H0, BC, DM, DH0, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr,
                  FROM_CARRY: tl.constexpr, HAS_H0: tl.constexpr):
    """Phase 3 backward over chunk ``c = [s, e)``, last step first:
    ``B_t = G_t + B_{t+1} @ M_{t+1}^T``, ``dM_t = H_{t-1}^T @ B_t``; the chunk holding step 0 also
    writes ``dH0 = B_0 @ M_0^T``. ``H_{-1}`` is ``H0`` (identity when there is none).
    """
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, D)
    inside = (r[:, None] < DIM) & (r[None, :] < DIM)
    offs = r[:, None] * DIM + r[None, :]
    offs_t = r[None, :] * DIM + r[:, None]
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    if FROM_CARRY:
        b = tl.load(BC + (n * n_chunks + c) * D * D + r[:, None] * D + r[None, :])
    else:
        b = tl.full((D, D), 0.0, tl.float32)
    if HAS_H0:
        h0_t = tl.load(H0 + n * DIM * DIM + offs_t, mask=inside, other=0.0).to(tl.float32)
    else:
        h0_t = tl.where((r[:, None] == r[None, :]) & inside, 1.0, 0.0)
    m_seq = M + n * T * DIM * DIM
    h_seq = H + n * T * DIM * DIM
    g_seq = G + n * T * DIM * DIM
    dm_seq = DM + n * T * DIM * DIM
    # M_{t+1}^T for the step being taken; each M is read once and reused by the next step
    m_next = tl.load(m_seq + end * DIM * DIM + offs_t, mask=inside & (r[:, None] * 0 + end < T),
                     other=0.0).to(tl.float32)
    for k in range(0, end - start):
        t = end - 1 - k
        g = tl.load(g_seq + t * DIM * DIM + offs, mask=inside, other=0.0).to(tl.float32)
        b = g + tl.dot(b, m_next, input_precision="ieee")
        m_next = tl.load(m_seq + t * DIM * DIM + offs_t, mask=inside, other=0.0).to(tl.float32)
        h_prev = tl.load(h_seq + (t - 1) * DIM * DIM + offs_t, mask=inside & (r[:, None] * 0 + t > 0),
                         other=0.0).to(tl.float32)
        h_prev = tl.where(t > 0, h_prev, h0_t)
        dm = tl.dot(h_prev, b, input_precision="ieee")
        tl.store(dm_seq + t * DIM * DIM + offs, dm.to(DM.dtype.element_ty), mask=inside)
    if HAS_H0:
        if start == 0:
            dh0 = tl.dot(b, m_next, input_precision="ieee")
            tl.store(DH0 + n * DIM * DIM + offs, dh0.to(DH0.dtype.element_ty), mask=inside)
