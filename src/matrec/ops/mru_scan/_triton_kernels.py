"""Triton kernel bodies of the chunked MRU scan (forward docs/design.md §2.1, backward §2.2; the
kernel design is docs/kernel.md "Design").

The bodies are plain functions, not decorated with ``@triton.jit``: ``matrec.ops.mru_scan.triton`` wraps
each one itself, compiled for a GPU or interpreted for CPU tensors, whatever ``TRITON_INTERPRET`` said
when this module was imported. They call only ``tl.*`` builtins (``tl.full``, never ``tl.zeros``) and the
helpers below, made with ``device_function``: Triton's interpreter runs a body's callees as they are,
and the ``@jit`` helpers of ``triton.language.standard`` (``zeros``, ``sum``, ...) were
compiled-or-interpreted once, when triton was first imported, so they fail in an interpreted body if
triton came in without TRITON_INTERPRET.
Scalar conditions in load masks are broadcast to a block first (``j * 0 + t > 0``): the
interpreter mistypes ``block_mask & scalar_mask``.

Layout: ``M``, ``H``, ``dH`` (= dL/dH), ``DM`` are contiguous ``[N, T, DIM, DIM]`` in their I/O dtype;
``H0``/``DH0`` are ``[N, DIM, DIM]``. A program owns ``SEQ`` sequences at once and holds their matrices
as one ``[SEQ, D, D]`` fp32 block, so every step is ONE batched ``tl.dot`` for ``SEQ`` matrices (the
shared-memory round trip and barrier a dot costs are paid once for all of them). ``D`` = DIM rounded
up to a power of two, at least 8: the smallest K Triton's fp32 dot takes (M and N could be smaller,
but the state is the next step's left operand, so its columns are a K). Padding is zero, which
products keep zero, so the top-left ``DIM x DIM`` block is exact. Sequences past ``N`` (the last
program's tail) are masked: loaded as zero, never stored. Chunk buffers (``P``, ``S``, ``L``, ``BC``)
are fp32 ``[N, n_chunks, D, D]``. Products use ``input_precision="ieee"``: true fp32 FMAs, never
TF32, so the kernel matches the float32 reference.

A sequence is cut into chunks of ``CHUNK`` steps; program ``(p, c)`` owns chunk ``c`` of sequences
``p*SEQ .. p*SEQ+SEQ-1``. Every time loop is a ``tl.range(..., num_stages=STAGES)``: the step's loads
do not depend on the carried state, so Triton's software pipeliner issues them ``STAGES - 1`` steps
ahead (asynchronous copies into shared memory) and a step waits for its product, not for HBM.

The backward carries ``X`` = the adjoint flowing into a step from the step after it
(``B_t = dH_t + X``, then ``X <- B_t @ M_t^T``), so every load of a step has the same index ``t``, and
across a chunk ``[s, e)`` the carry is affine: ``X_out = L + X_in @ P^T`` with ``P = M_s ... M_{e-1}``
the very chunk total the forward computed (kept, not recomputed: one product per step).
"""
import triton.language as tl

from ..triton_support import device_function


def _blocks(N, DIM: tl.constexpr, D: tl.constexpr, SEQ: tl.constexpr):
    """This program's ``SEQ`` sequences ``n`` [SEQ, 1, 1], the row and column indices ``i`` [1, D, 1] and
    ``j`` [1, 1, D] of their padded blocks, and two [SEQ, D, D] masks: ``real`` (the sequences that
    exist) and ``inside`` (their unpadded DIM x DIM blocks)."""
    n = tl.program_id(0).to(tl.int64) * SEQ + tl.arange(0, SEQ)[:, None, None]
    i = tl.arange(0, D)[None, :, None]
    j = tl.arange(0, D)[None, None, :]
    real = (n < N) & (i + j * 0 < D)
    return n, i, j, real, real & (i < DIM) & (j < DIM)


def _load(PTRS, mask):
    """[SEQ, D, D] float32 blocks, zero where ``mask`` is off (padding, sequences past N)."""
    return tl.load(PTRS, mask=mask, other=0.0).to(tl.float32)


def _identity(i, j, inside):
    return tl.where((i == j) & inside, 1.0, 0.0)


def _initial(H0, n, i, j, inside, DIM: tl.constexpr, HAS_H0: tl.constexpr):
    """``H0[n]`` ([N, DIM, DIM]) as float32 blocks (``i`` and ``j`` swapped: its transpose), or
    identities when there is no ``H0``."""
    if HAS_H0:
        h = load(H0 + n * DIM * DIM + i * DIM + j, inside)
    else:
        h = identity(i, j, inside)
    return h


blocks, load = device_function(_blocks), device_function(_load)
identity, initial = device_function(_identity), device_function(_initial)


def mru_fwd_chunk_total(M, P, N, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr,
                        SEQ: tl.constexpr, STAGES: tl.constexpr):
    """Phase 1 forward: ``P[n, c] = M_s @ ... @ M_{e-1}``, the product over chunk ``c = [s, e)``."""
    c = tl.program_id(1)
    n, i, j, real, inside = blocks(N, DIM, D, SEQ)
    seq = M + n * T * DIM * DIM + i * DIM + j
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    acc = identity(i, j, inside)  # [SEQ, D, D]
    for t in tl.range(start, end, num_stages=STAGES):
        acc = tl.dot(acc, load(seq + t * DIM * DIM, inside), input_precision="ieee")
    tl.store(P + (n * n_chunks + c) * D * D + i * D + j, acc, mask=real)


def mru_fwd_chunk_carry(P, S, H0, N, n_chunks, DIM: tl.constexpr, D: tl.constexpr, SEQ: tl.constexpr,
                        HAS_H0: tl.constexpr, STAGES: tl.constexpr):
    """Phase 2 forward, one program per ``SEQ`` sequences: ``S[n, c] = H0 @ P[n, 0] @ ... @ P[n, c-1]``,
    the state entering chunk ``c`` (an exclusive scan over the chunk totals)."""
    n, i, j, real, inside = blocks(N, DIM, D, SEQ)
    carry = initial(H0, n, i, j, inside, DIM, HAS_H0)
    chunks = n * n_chunks * D * D + i * D + j
    for c in tl.range(0, n_chunks, num_stages=STAGES):
        tl.store(S + chunks + c * D * D, carry, mask=real)
        carry = tl.dot(carry, load(P + chunks + c * D * D, real), input_precision="ieee")


def mru_fwd_apply(M, H, S, H0, N, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr,
                  SEQ: tl.constexpr, CARRY: tl.constexpr, STAGES: tl.constexpr):
    """Phase 3 forward: ``H_t = H_{t-1} @ M_t`` over chunk ``c``, starting from its entering state.

    ``CARRY``: 0 = identity, 1 = ``H0[n]`` (single chunk, phases 1-2 skipped), 2 = ``S[n, c]``.
    """
    c = tl.program_id(1)
    n, i, j, real, inside = blocks(N, DIM, D, SEQ)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    if CARRY == 2:
        h = load(S + (n * n_chunks + c) * D * D + i * D + j, real)
    else:
        h = initial(H0, n, i, j, inside, DIM, CARRY == 1)
    offs = n * T * DIM * DIM + i * DIM + j
    for t in tl.range(start, end, num_stages=STAGES):
        h = tl.dot(h, load(M + offs + t * DIM * DIM, inside), input_precision="ieee")
        tl.store(H + offs + t * DIM * DIM, h.to(H.dtype.element_ty), mask=inside)


def mru_bwd_chunk_affine(M, dH, L, N, T, n_chunks, CHUNK, DIM: tl.constexpr, D: tl.constexpr,
                         SEQ: tl.constexpr, STAGES: tl.constexpr):
    """Phase 1 backward: ``L[n, c]``, the carry chunk ``c = [s, e)`` passes to the step before it when
    none comes in from after it: ``X <- (dH_t + X) @ M_t^T`` for ``t = e-1 .. s`` from ``X = 0``.
    One product per step; the linear part of the chunk's map is ``P^T`` from the forward."""
    c = tl.program_id(1)
    n, i, j, real, inside = blocks(N, DIM, D, SEQ)
    base = n * T * DIM * DIM
    offs = base + i * DIM + j
    offs_t = base + j * DIM + i  # reads the transpose
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    x = tl.full((SEQ, D, D), 0.0, tl.float32)
    for k in tl.range(0, end - start, num_stages=STAGES):
        t = end - 1 - k
        g = load(dH + offs + t * DIM * DIM, inside)
        x = tl.dot(g + x, load(M + offs_t + t * DIM * DIM, inside), input_precision="ieee")
    tl.store(L + (n * n_chunks + c) * D * D + i * D + j, x, mask=real)


def mru_bwd_chunk_carry(P, L, BC, N, n_chunks, D: tl.constexpr, SEQ: tl.constexpr,
                        STAGES: tl.constexpr):
    """Phase 2 backward, one program per ``SEQ`` sequences, last chunk first: ``BC[n, c]`` = the carry
    entering chunk ``c`` from after it (zero for the last chunk), by ``X <- L[c] + X @ P[c]^T``."""
    n, i, j, real, _ = blocks(N, D, D, SEQ)
    row = n * n_chunks * D * D
    x = tl.full((SEQ, D, D), 0.0, tl.float32)
    for k in tl.range(0, n_chunks, num_stages=STAGES):
        base = row + (n_chunks - 1 - k) * D * D
        tl.store(BC + base + i * D + j, x, mask=real)
        x = tl.dot(x, load(P + base + j * D + i, real), acc=load(L + base + i * D + j, real),
                   input_precision="ieee")


def mru_bwd_apply(M, H, dH, H0, BC, DM, DH0, N, T, n_chunks, CHUNK, DIM: tl.constexpr,
                  D: tl.constexpr, SEQ: tl.constexpr, FROM_CARRY: tl.constexpr, HAS_H0: tl.constexpr,
                  STAGES: tl.constexpr):
    """Phase 3 backward over chunk ``c = [s, e)``, last step first: ``B_t = dH_t + X``,
    ``dM_t = H_{t-1}^T @ B_t``, ``X <- B_t @ M_t^T``; after step 0, ``X`` is ``dH0``.
    ``H_{-1}`` is ``H0`` (the identity when there is none)."""
    c = tl.program_id(1)
    n, i, j, real, inside = blocks(N, DIM, D, SEQ)
    base = n * T * DIM * DIM
    offs = base + i * DIM + j
    offs_t = base + j * DIM + i
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, T)
    if FROM_CARRY:
        x = load(BC + (n * n_chunks + c) * D * D + i * D + j, real)
    else:
        x = tl.full((SEQ, D, D), 0.0, tl.float32)
    h0_t = initial(H0, n, j, i, inside, DIM, HAS_H0)  # H0^T
    for k in tl.range(0, end - start, num_stages=STAGES):
        t = end - 1 - k
        g = load(dH + offs + t * DIM * DIM, inside)
        m_t = load(M + offs_t + t * DIM * DIM, inside)
        h_prev = tl.where(t > 0, load(H + offs_t + (t - 1) * DIM * DIM, inside & (j * 0 + t > 0)), h0_t)
        b = g + x
        tl.store(DM + offs + t * DIM * DIM, tl.dot(h_prev, b, input_precision="ieee")
                 .to(DM.dtype.element_ty), mask=inside)
        x = tl.dot(b, m_t, input_precision="ieee")
    if HAS_H0:
        tl.store(DH0 + n * DIM * DIM + i * DIM + j, x.to(DH0.dtype.element_ty),
                 mask=inside & (j * 0 + c == 0))
