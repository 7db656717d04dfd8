"""Split-K (flash-decoding) attention over a compressed K/V cache.

Pass 0, `attention_query_kernel`: each query row is rotated into K's domain and pre-scaled, by one
product with a table the host scales once per (spec, scale): ``q' = q @ (f R_K^T)`` and, with K's QJL,
``(S q)' = q @ (f sqrt(pi/2)/m_K S_K^T)``, ``f = scale * log2(e)``.

Pass 1, `attention_split_kernel`: program ``(bh, split, row block)`` walks the keys of one split in blocks
of ``BLOCK_N`` with an online softmax in base 2. One loop body runs twice: first, without masks, over the
blocks whose keys every query row sees; then, with masks, over the rest (a split's last, partial block, and
with ``CAUSAL`` the blocks that some rows see only in part). Queries arrive rotated and pre-scaled,
``q' = scale * log2(e) * Rot_K(q)`` (plus the QJL sketch ``scale * log2(e) * sqrt(pi/2)/m_K * S_K q``), so a
key's logit is

    t_n = s_n * (q' . c[k_n]) + rho_n * (S q)' . z_n

Query row ``g * q_len + t`` (query ``t`` of the group's head ``g``) sees keys ``n < length``, and
with ``CAUSAL`` only ``n < length - (q_len - 1 - t)``; masked logits are ``-inf``, and a row that
has seen no key yet keeps ``mx = -inf`` (its exponentials are taken against 0, so they are 0).

Values stay in V's rotated domain: the split accumulates ``sum_n p_n v_n c[k_n]`` and
``sum_n p_n rho_n z_n`` (V's norms ``v_n``, residual norms ``rho_n``, signs ``z_n``), with the
running max ``mx`` and denominator ``l``.

Sub-splits. A tensor-core product has at least 16 rows, and at decode a KV head has only ``R`` query rows (its
group of query heads). The program's rows then carry ``SUBSPLITS = S`` sub-splits (a power of two,
``S * R <= 16``): row ``s * R + i`` is query row ``i`` over sub-split ``s``, which reads sub-block ``s`` of
every key block, keys ``n0 + s * B + (0 .. B - 1)`` with ``B = BLOCK_N / S``. A block's logits are one
``(16, B)`` tile and its value sums one product per sub-block,

    T = sum_s Q_s K_s^T        acc += sum_s P_s V_s

with ``Q_s`` (``P_s``) the query rows (weights) in sub-split ``s``'s rows and zero in the others', ``K_s``, ``V_s``
the sub-block's levels: the products do the work of one ``(16, BLOCK_N)`` tile, and the softmax runs on the
``R * S`` rows that are real instead of on 16 rows of which ``R`` are. Each sub-split keeps its own ``mx``, ``l``
and sums and is written as a partial result of its own.

The loop is bound by the instructions that unpack codes, so everything else is taken out of it: key offsets
are int32 where every one fits (``KEY_INDEX``); the split's largest value norm ``v_big`` (and residual norm)
is found by a pass over the split's norms before the loop, so the value weights ``p_n v_n / v_big`` need no
per-block max; without K's QJL the logits are kept in units of the query row's max ``|q'|`` (``q_max``, out of
the products), so a logit costs one multiply by ``s_n`` and the exponent one FMA, ``t q_max - mx q_max``; the
denominator is summed per key and reduced after the loop, and the value products accumulate in place. Codes in
the interleaved packing become float16 levels by byte-permute lookups (`rotorquant.kernels.levels`).

Pass 2, `attention_combine_kernel`: merges the partial results of the splits and sub-splits (weights
``2^(mx_s - max)``), divides by ``l`` (NaN for a sequence whose length is out of range, which only
``validate=False`` lets through) and maps back to the original space once per query:

    out = (acc / l) @ R_V + sqrt(pi/2)/m_V * (acc_qjl / l) @ S_V

Operands of the two ``tl.dot`` s of pass 1 are cast to ``DOT_DTYPE`` (float16 for half
precision queries, float32 otherwise). Query rows are divided by their max ``|q'|`` and the
value weights ``p_n v_n`` by the split's max ``v_big`` first, so float16 operands lie in [-1, 1].
"""

import triton
import triton.language as tl

from .levels import byte_tables, load_interleaved_levels, load_levels, load_signs


@triton.jit
def _unit_rows(
    t,  # (ROWS, COLS) float32
):
    """``(t / r, r)`` with ``r`` each row's max ``|t|`` (1 for all-zero rows)."""
    r = tl.max(tl.abs(t), axis=1)
    r = tl.where(r > 0, r, 1.0)
    return t / r[:, None], r


@triton.jit
def load_length(
    ptr,  # pointer to one sequence's length, int32 or int64
    N,  # cache length (keys per head)
):
    """The length as int32, clamped to ``-1..N + 1``: a value out of ``0..N`` stays out of it (an int64
    past int32 would otherwise wrap into range)."""
    return tl.minimum(tl.maximum(tl.load(ptr), -1), N + 1).to(tl.int32)


@triton.jit
def attention_query_kernel(
    q_ptr,  # (B, Hq, T, dk) queries, any float dtype, unit stride along dk
    q_sb, q_sh, q_st,  # element strides of q's batch, head and query axes
    rot_ptr,  # (BLOCK_DK, BLOCK_DK) CDT f R_K^T, zero-padded
    sk_ptr,  # K QJL: (BLOCK_DK, BLOCK_MK) CDT f sqrt(pi/2)/m_K S_K^T, zero-padded
    qrot_ptr,  # (BH, R, BLOCK_DK) CDT output: pre-scaled rotated queries, zero past dk
    qsk_ptr,  # K QJL: (BH, R, BLOCK_MK) CDT output: pre-scaled query sketches, zero past mk
    kv_heads,  # KV heads (bh // kv_heads is the batch index)
    R,  # query rows per KV head: group * q_len (row g * q_len + t is query t of the group's head g)
    q_len,  # queries per sequence
    dk: tl.constexpr,  # key dimension
    K_QJL: tl.constexpr,  # keys carry a QJL sketch
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 queries, else tl.float32
    DOT_PRECISION: tl.constexpr,  # input_precision of the tl.dots: "tf32x3" (float32-accurate) or "ieee"
    BLOCK_Q: tl.constexpr,  # query rows per program (>= 16)
    BLOCK_DK: tl.constexpr,  # power of two >= max(dk, 16)
    BLOCK_MK: tl.constexpr,  # power of two >= max(mk, 16)
    BLOCK_C: tl.constexpr,  # tile of the products (output columns, and dk per step): power of two,
    # 16 <= BLOCK_C <= BLOCK_DK (and <= BLOCK_MK with K_QJL)
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // kv_heads, bh % kv_heads
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < R
    head = h * (R // q_len) + rows // q_len
    src = (q_ptr + b * q_sb + head.to(tl.int64) * q_sh + (rows % q_len).to(tl.int64) * q_st)[:, None]
    out = (bh * R + rows)[:, None]
    _rows_times(src, row_ok, dk, rot_ptr, BLOCK_DK, qrot_ptr + out * BLOCK_DK, CDT, DOT_PRECISION, BLOCK_Q, BLOCK_DK, BLOCK_C)
    if K_QJL:
        _rows_times(src, row_ok, dk, sk_ptr, BLOCK_MK, qsk_ptr + out * BLOCK_MK, CDT, DOT_PRECISION, BLOCK_Q, BLOCK_DK, BLOCK_C)


@triton.jit
def _rows_times(
    src,  # (ROWS, 1) pointers to the rows' first elements (unit stride along the row)
    row_ok,  # (ROWS,) bool: which rows exist
    dk,  # row length; elements past it are read as 0
    mat_ptr,  # (BLOCK_DK, COLS) CDT matrix, row-major
    COLS: tl.constexpr,  # its columns (a multiple of BLOCK_C)
    dst,  # (ROWS, 1) pointers to each output row's first element (unit stride)
    CDT: tl.constexpr,  # compute dtype
    DOT_PRECISION: tl.constexpr,  # input_precision of the tl.dots
    ROWS: tl.constexpr,  # rows
    BLOCK_DK: tl.constexpr,  # padded row length
    BLOCK_C: tl.constexpr,  # tile: output columns per step, and row elements per partial product
):
    """``dst = rows @ mat`` tile by tile (loops, not unrolled: the registers of one tile at any size)."""
    for c0 in range(0, COLS, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        acc = tl.zeros((ROWS, BLOCK_C), dtype=CDT)
        for k0 in range(0, BLOCK_DK, BLOCK_C):
            kk = k0 + tl.arange(0, BLOCK_C)
            x = tl.load(src + kk[None, :], mask=row_ok[:, None] & (kk < dk)[None, :], other=0.0).to(CDT)
            acc += tl.dot(x, tl.load(mat_ptr + kk[:, None] * COLS + cc[None, :]), input_precision=DOT_PRECISION)
        tl.store(dst + cc[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _field_rows(
    fields,  # (codes, norms, signs, res_norms) pointers of one side's cache
    strides,  # their (batch, head, key) element strides: 12 values, field by field
    seq,  # int64 sequence index (0 for a paged cache, whose blocks carry the sequence)
    h,  # int64 KV head
):
    """Each field's pointer advanced to sequence ``seq`` and head ``h``."""
    return (
        fields[0] + seq * strides[0] + h * strides[1],
        fields[1] + seq * strides[3] + h * strides[4],
        fields[2] + seq * strides[6] + h * strides[7],
        fields[3] + seq * strides[9] + h * strides[10],
    )


@triton.jit
def _key_slots(
    keys,  # (BLOCK_N,) logical key indices
    k_ok,  # (BLOCK_N,) bool: which keys to read
    table,  # paged: (table_ptr, row stride, num_blocks) of sequence b's block table row
    b,  # int64 sequence index
    PAGE: tl.constexpr,  # keys per block of a paged cache; 0: not paged
    INDEX: tl.constexpr,  # tl.int32 when every field offset outer * s_b + n * s_n fits it, else tl.int64
):
    """``(outer, n, bad)``: key ``keys[i]`` lies at ``outer * s_b + n * s_n`` past its head's row, ``outer`` a
    block id (paged: key n is slot ``n % PAGE`` of block ``table[b, n // PAGE]``) or 0, both in ``INDEX``, and
    ``bad`` marks the keys whose block id is out of range (block 0 is read in their place)."""
    if PAGE:
        table_ptr, row_stride, num_blocks = table
        blk = tl.load(table_ptr + b * row_stride + keys // PAGE, mask=k_ok, other=0)
        blk_ok = (blk >= 0) & (blk < num_blocks)
        return tl.where(blk_ok, blk, 0).to(INDEX), (keys % PAGE).to(INDEX), k_ok & ~blk_ok
    else:
        return tl.zeros_like(keys).to(INDEX), keys.to(INDEX), keys < 0


@triton.jit
def _operands_at(
    rows,  # (codes, norms, signs, res_norms) pointers at one head (`_field_rows`)
    strides,  # the fields' (batch, head, key) strides
    outer,  # (BLOCK_N,) block of each key (0 unless paged), int32 or int64 (`_key_slots`)
    n,  # (BLOCK_N,) key (or slot) index, as outer
    k_ok,  # (BLOCK_N,) bool: which keys exist
    cent_ptr,  # (2**BITS,) CDT centroids
    tables,  # INTERLEAVED with float16 DOT_DTYPE: the centroids' byte tables (`byte_tables`); else None
    d: tl.constexpr,  # coordinates per vector
    m,  # QJL projections
    BITS: tl.constexpr,  # bits per code
    QJL: tl.constexpr,  # vectors carry a QJL sketch
    INTERLEAVED: tl.constexpr,  # codes in the interleaved packing (else contiguous)
    PRMT: tl.constexpr,  # INTERLEAVED float16 levels by inline prmt.b32 (a GPU); else by integer operations
    DOT_DTYPE: tl.constexpr,  # dtype of the levels and signs (tl.dot operands)
    BLOCK_N: tl.constexpr,  # keys
    BLOCK_D: tl.constexpr,  # power of two >= max(d, 16)
    BLOCK_M: tl.constexpr,  # power of two >= max(m, 16)
    WORDS: tl.constexpr,  # packed rows start 4-byte aligned, whole 32-bit words long
):
    """``(levels (BLOCK_N, BLOCK_D), signs (BLOCK_N, BLOCK_M))`` of a block of cached vectors, the operands of
    the products; the levels again in place of the signs without QJL."""
    codes, signs = rows[0], rows[2]
    code_rows = codes + outer * strides[0] + n * strides[2]
    if INTERLEAVED:
        level = load_interleaved_levels(
            code_rows, k_ok, d, cent_ptr, tables, BITS, BLOCK_N, BLOCK_D, DOT_DTYPE, WORDS, PRMT
        )
    else:
        code_bytes: tl.constexpr = (d * BITS + 7) // 8
        level = load_levels(code_rows, k_ok, code_bytes, cent_ptr, d, BITS, BLOCK_N, BLOCK_D, DOT_DTYPE, WORDS)
    if QJL:
        z = load_signs(
            signs + outer * strides[6] + n * strides[8], k_ok, (m + 7) // 8, m, BLOCK_N, BLOCK_M, DOT_DTYPE, WORDS
        )
        return level, z
    else:
        return level, level


@triton.jit
def _scales_at(
    rows,  # (codes, norms, signs, res_norms) pointers at one head (`_field_rows`)
    strides,  # the fields' (batch, head, key) strides
    outer,  # (..) block of each key (0 unless paged), int32 or int64 (`_key_slots`)
    n,  # (..) key (or slot) index, as outer
    ok,  # (..) bool: which keys to read (the others read as 0)
    QJL: tl.constexpr,  # vectors carry a QJL sketch
    CDT: tl.constexpr,  # compute dtype
):
    """``(norms, residual norms)`` of the keys, each shaped as ``n``; the norms again without QJL."""
    norm = tl.load(rows[1] + outer * strides[3] + n * strides[5], mask=ok, other=0.0).to(CDT)
    if QJL:
        return norm, tl.load(rows[3] + outer * strides[9] + n * strides[11], mask=ok, other=0.0).to(CDT)
    else:
        return norm, norm


@triton.jit
def _split_max(
    rows,  # V's (codes, norms, signs, res_norms) pointers at one head (`_field_rows`)
    strides,  # their (batch, head, key) strides
    start,  # the split's first key
    end,  # its end (exclusive)
    table,  # paged: (table_ptr, row stride, num_blocks), as `_key_slots` takes it
    b,  # int64 sequence index
    QJL: tl.constexpr,  # values carry a QJL sketch (also find the largest residual norm)
    PAGE: tl.constexpr,  # keys per block of a paged cache; 0: not paged
    INDEX: tl.constexpr,  # dtype of the key offsets (`_key_slots`)
    CDT: tl.constexpr,  # compute dtype
    BLOCK_N: tl.constexpr,  # keys per step
):
    """``(v_big, r_big)``: the largest value norm and value residual norm of the split's keys (1 where all are
    0, or without QJL for ``r_big``), so the value weights ``p v / v_big`` lie in [0, 1]."""
    norms, res = rows[1], rows[3]
    v_big = tl.zeros((BLOCK_N,), dtype=CDT)
    r_big = tl.zeros((BLOCK_N,), dtype=CDT)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k_ok = keys < end
        outer, n, bad = _key_slots(keys, k_ok, table, b, PAGE, INDEX)  # bad ids: counted by the main loop
        v_big = tl.maximum(v_big, tl.load(norms + outer * strides[3] + n * strides[5], mask=k_ok, other=0.0).to(CDT))
        if QJL:
            r_big = tl.maximum(r_big, tl.load(res + outer * strides[9] + n * strides[11], mask=k_ok, other=0.0).to(CDT))
    v_big = tl.max(v_big, axis=0)
    r_big = tl.max(r_big, axis=0)
    return tl.where(v_big > 0, v_big, 1.0), tl.where(r_big > 0, r_big, 1.0)


@triton.jit
def _sub_copies(
    x,  # (BLOCK_Q, C) operand rows
    sub,  # (BLOCK_Q,) each row's sub-split
    SUBSPLITS: tl.constexpr,  # sub-splits
):
    """A tuple of ``SUBSPLITS`` copies of ``x``, copy ``s`` zero outside the rows of sub-split ``s`` (``x`` itself for
    one sub-split): the A operand that meets sub-block ``s`` of a key block."""
    copies = ()
    for s in tl.static_range(SUBSPLITS):
        copies = copies + (_rows_of(x, sub, s, SUBSPLITS),)
    return copies


@triton.jit
def _rows_of(
    x,  # (BLOCK_Q, C) tensor
    sub,  # (BLOCK_Q,) each row's sub-split
    s: tl.constexpr,  # which sub-split
    SUBSPLITS: tl.constexpr,  # sub-splits
):
    """``x`` in the rows of sub-split ``s``, zero in the others (``x`` itself for one sub-split)."""
    if SUBSPLITS > 1:
        return tl.where((sub == s)[:, None], x, tl.zeros_like(x))
    else:
        return x


@triton.jit
def _sub_block(
    n0,  # the block's first key
    s: tl.constexpr,  # which sub-block
    SUB_N: tl.constexpr,  # keys per sub-block
    end,  # the split's end (exclusive)
    MASKED: tl.constexpr,  # keys past end may occur
    table,  # paged: (table_ptr, row stride, num_blocks), as `_key_slots` takes it
    b,  # int64 sequence index
    PAGE: tl.constexpr,  # keys per block of a paged cache; 0: not paged
    INDEX: tl.constexpr,  # dtype of the key offsets (`_key_slots`)
):
    """``(outer, n, ok, bad)`` of sub-block ``s``, keys ``n0 + s * SUB_N + (0 .. SUB_N - 1)``: its slots as
    `_operands_at` takes them, and its keys whose block id is out of range (`_key_slots`)."""
    keys = n0 + s * SUB_N + tl.arange(0, SUB_N)
    ok = keys < end if MASKED else tl.full((SUB_N,), True, tl.int1)
    outer, n, bad = _key_slots(keys, ok, table, b, PAGE, INDEX)
    return outer, n, ok, bad


@triton.jit
def attention_split_kernel(
    queries,  # (q_rot, q_sketch): (BH, R, BLOCK_DK) CDT pre-scaled rotated queries, zero-padded, and with
    # K QJL (BH, R, BLOCK_MK) CDT pre-scaled query sketches, zero-padded
    k_cache,  # K's (codes, norms, signs, res_norms, centroids): codes (B, Hkv, N, k_code_bytes) uint8, norms
    # (B, Hkv, N), K QJL: signs (B, Hkv, N, ceil(mk / 8)) uint8 and residual norms (B, Hkv, N); centroids
    # (2**K_BITS,) CDT. Paged (PAGE > 0): (block, KV head, slot) instead of (batch, KV head, key)
    k_strides,  # (batch, head, key) element strides of K's four fields, 12 values (any layout: head-major,
    # token-major, a slice of a bigger cache; a row's packed bytes contiguous)
    v_cache,  # V's (codes, norms, signs, res_norms, centroids), as k_cache
    v_strides,  # V's 12 strides, as k_strides
    lengths_ptr,  # (batch,) int32 or int64 keys to attend to per sequence (any value: see load_length)
    table,  # paged: (table_ptr, row stride, num_blocks): (batch, max_blocks) int32 or int64 block table with a
    # unit column stride; an id outside 0..num_blocks - 1 where keys lie makes the sequence NaN
    partials,  # outputs (mx, denom, acc, acc_qjl), one entry per sub-split (PARTS = splits * SUBSPLITS; split
    # s's sub-split i is part s * SUBSPLITS + i): (BH, PARTS, R) CDT running max (base 2), -inf for an empty one;
    # (BH, PARTS, R) CDT softmax denominator; (BH, PARTS, R, BLOCK_DV) CDT rotated-domain value sum;
    # V QJL: (BH, PARTS, R, BLOCK_MV) CDT sum of p rho z
    kv_heads,  # KV heads (bh // kv_heads is the batch index)
    N,  # cache length (keys per head)
    R,  # query rows per KV head: group * q_len (row g * q_len + t is query t of the group's head g)
    q_len,  # queries per sequence
    split_len,  # keys per split (a multiple of BLOCK_N)
    splits,  # number of key splits
    dk: tl.constexpr,  # key dimension
    dv: tl.constexpr,  # value dimension
    mk,  # K QJL projections
    mv,  # V QJL projections
    K_BITS: tl.constexpr,  # key bits per code
    V_BITS: tl.constexpr,  # value bits per code
    K_QJL: tl.constexpr,  # keys carry a QJL sketch
    V_QJL: tl.constexpr,  # values carry a QJL sketch
    K_INTERLEAVED: tl.constexpr,  # K's codes in the interleaved packing (K_BITS 2..4, dk a multiple of 32)
    V_INTERLEAVED: tl.constexpr,  # V's codes in the interleaved packing (V_BITS 2..4, dv a multiple of 32)
    PRMT: tl.constexpr,  # interleaved float16 levels by inline prmt.b32 (a GPU); else by integer operations
    CAUSAL: tl.constexpr,  # query t sees only the first length - (q_len - 1 - t) keys
    PAGE: tl.constexpr,  # keys per block of a paged cache; 0: not paged
    KEY_INDEX: tl.constexpr,  # tl.int32 when every key's field offsets within its head's rows fit it, else tl.int64
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 inputs, else tl.float32
    DOT_DTYPE: tl.constexpr,  # tl.float16 (half-precision queries) or CDT: operand dtype of the tl.dots
    DOT_PRECISION: tl.constexpr,  # input_precision of float32 dots ("tf32x3" or "ieee"); ignored for float16
    BLOCK_Q: tl.constexpr,  # program rows (>= 16): query rows, or SUBSPLITS * R <= BLOCK_Q (sub-split, query row)
    BLOCK_N: tl.constexpr,  # keys per step: SUBSPLITS sub-blocks of BLOCK_N // SUBSPLITS >= 16 keys
    SUBSPLITS: tl.constexpr,  # sub-splits sharing the program's rows (power of two; > 1 only with one row block)
    BLOCK_DK: tl.constexpr,  # power of two >= max(dk, 16)
    BLOCK_DV: tl.constexpr,  # power of two >= max(dv, 16)
    BLOCK_MK: tl.constexpr,  # power of two >= max(mk, 16)
    BLOCK_MV: tl.constexpr,  # power of two >= max(mv, 16)
    K_WORDS: tl.constexpr,  # K's packed rows (codes, signs) start 4-byte aligned, whole 32-bit words long
    V_WORDS: tl.constexpr,  # V's packed rows (codes, signs) start 4-byte aligned, whole 32-bit words long
):
    qrot_ptr, qsk_ptr = queries
    mx_ptr, l_ptr, acc_ptr, accq_ptr = partials
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // kv_heads, bh % kv_heads
    split = tl.program_id(1)
    r = tl.arange(0, BLOCK_Q)
    if SUBSPLITS > 1:  # program row r: query row r % R over sub-split r // R
        sub = tl.minimum(r // R, SUBSPLITS - 1)
        rows = r % R
        row_ok = r < SUBSPLITS * R
    else:
        sub = tl.zeros_like(r)
        rows = tl.program_id(2) * BLOCK_Q + r
        row_ok = rows < R
    SUB_N: tl.constexpr = BLOCK_N // SUBSPLITS  # keys per sub-block
    length = load_length(lengths_ptr + b, N)
    start = split * split_len
    end = tl.minimum(tl.minimum(start + split_len, length), N)  # an unchecked length > N reads no further
    visible = length - (q_len - 1 - rows % q_len)  # (BLOCK_Q,) keys each row sees with CAUSAL

    # the query rows, each in its sub-split's copy only (zero in the others' rows)
    q_row = bh * R + rows
    q_tile = q_row[:, None] * BLOCK_DK + tl.arange(0, BLOCK_DK)[None, :]
    q = tl.load(qrot_ptr + q_tile, mask=row_ok[:, None], other=0.0)
    q, q_max = _unit_rows(q)
    q_subs = _sub_copies(q.to(DOT_DTYPE), sub, SUBSPLITS)
    if K_QJL:
        sk_tile = q_row[:, None] * BLOCK_MK + tl.arange(0, BLOCK_MK)[None, :]
        sk = tl.load(qsk_ptr + sk_tile, mask=row_ok[:, None], other=0.0)
        sk, sk_max = _unit_rows(sk)
        sk_subs = _sub_copies(sk.to(DOT_DTYPE), sub, SUBSPLITS)

    # this head's rows of each field (and this sequence's, unless paged)
    seq = tl.zeros((), dtype=tl.int64) if PAGE else b
    k_rows = _field_rows(k_cache, k_strides, seq, h)
    v_rows = _field_rows(v_cache, v_strides, seq, h)
    bad_ids = tl.zeros((SUB_N,), dtype=tl.int32)  # paged: keys whose block id is out of range
    # interleaved float16 levels: the centroids' byte tables, once per program
    if K_INTERLEAVED and DOT_DTYPE == tl.float16:
        k_tables = byte_tables(k_cache[4], K_BITS)
    else:
        k_tables = None
    if V_INTERLEAVED and DOT_DTYPE == tl.float16:
        v_tables = byte_tables(v_cache[4], V_BITS)
    else:
        v_tables = None
    v_big, r_big = _split_max(v_rows, v_strides, start, end, table, b, V_QJL, PAGE, KEY_INDEX, CDT, BLOCK_N)
    v_inv, r_inv = 1.0 / v_big, 1.0 / r_big
    # logits t are kept in units of t_scale per row: without K's QJL the query's max |q'| stays out of the
    # products (the logit is t * q_max), with it both terms are scaled in full (t_scale = 1)
    if K_QJL:
        t_scale = tl.full((BLOCK_Q,), 1.0, dtype=CDT)
    else:
        t_scale = q_max

    mx = tl.full((BLOCK_Q,), float("-inf"), dtype=CDT)
    l_keys = tl.zeros((BLOCK_Q, SUB_N), dtype=CDT)  # the denominator, per key column; summed after the loop
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), dtype=CDT)
    accq = tl.zeros((BLOCK_Q, BLOCK_MV), dtype=CDT)
    # blocks whose keys every row sees need no masks: the first pass runs them, the second the rest
    seen = tl.minimum(end, length - (q_len - 1)) if CAUSAL else end  # keys every row sees
    unmasked_end = start + tl.maximum(seen - start, 0) // BLOCK_N * BLOCK_N
    for MASKED in tl.static_range(2):
        for n0 in range(unmasked_end if MASKED else start, end if MASKED else unmasked_end, BLOCK_N):
            subs = ()  # (outer, n, ok, bad) of each sub-block's keys, for the K and the V operands
            for s in tl.static_range(SUBSPLITS):
                subs = subs + (_sub_block(n0, s, SUB_N, end, MASKED, table, b, PAGE, KEY_INDEX),)
                bad_ids += subs[s][3].to(tl.int32)
            # the key of each logit, (BLOCK_Q, SUB_N) (one sub-split: (1, SUB_N), the sub-block's): row r's sub-split
            # reads sub-block sub[r] of the block
            if SUBSPLITS > 1:
                keys = n0 + sub[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]
                ok = keys < end if MASKED else tl.full((BLOCK_Q, SUB_N), True, tl.int1)
                outer, n, _ = _key_slots(keys, ok, table, b, PAGE, KEY_INDEX)
            else:
                keys = (n0 + tl.arange(0, SUB_N))[None, :]
                outer, n, ok = subs[0][0][None, :], subs[0][1][None, :], subs[0][2][None, :]
            kn, rho = _scales_at(k_rows, k_strides, outer, n, ok, K_QJL, CDT)
            # logits of this key block (base 2, in units of t_scale): sub-block s meets the rows of sub-split s
            t = tl.zeros((BLOCK_Q, SUB_N), dtype=CDT)
            sketch = tl.zeros((BLOCK_Q, SUB_N), dtype=CDT)
            for s in tl.static_range(SUBSPLITS):
                outer_s, n_s, ok_s, _ = subs[s]
                level, z = _operands_at(
                    k_rows, k_strides, outer_s, n_s, ok_s, k_cache[4], k_tables, dk, mk, K_BITS, K_QJL, K_INTERLEAVED,
                    PRMT, DOT_DTYPE, SUB_N, BLOCK_DK, BLOCK_MK, K_WORDS,
                )  # fmt: skip
                t = tl.dot(q_subs[s], tl.trans(level), t, input_precision=DOT_PRECISION)
                if K_QJL:
                    sketch = tl.dot(sk_subs[s], tl.trans(z), sketch, input_precision=DOT_PRECISION)
            t = t * kn
            if K_QJL:
                t = t * q_max[:, None] + sketch * sk_max[:, None] * rho
            if MASKED and CAUSAL:
                t = tl.where(keys < tl.minimum(visible, end)[:, None], t, float("-inf"))
            elif MASKED:
                t = tl.where(keys < end, t, float("-inf"))
            # online softmax; in the masked pass a row may have seen no key yet (causal, or a sub-split whose keys
            # all lie past the end): it keeps mx = -inf and weight 0
            mx_new = tl.maximum(mx, tl.max(t, axis=1))
            if MASKED:
                ref = tl.where(mx_new == float("-inf"), 0.0, mx_new)
            else:
                ref = mx_new
            alpha = tl.exp2((mx - ref) * t_scale)
            p = tl.exp2(t * t_scale[:, None] - (ref * t_scale)[:, None])
            l_keys = l_keys * alpha[:, None] + p
            mx = mx_new
            # values, in V's rotated domain, weighted by p v / v_big (and p rho / r_big) in [0, 1]
            vn, vrho = _scales_at(v_rows, v_strides, outer, n, ok, V_QJL, CDT)
            pv = (p * (vn * v_inv)).to(DOT_DTYPE)
            acc = acc * alpha[:, None]
            if V_QJL:
                pr = (p * (vrho * r_inv)).to(DOT_DTYPE)
                accq = accq * alpha[:, None]
            for s in tl.static_range(SUBSPLITS):
                outer_s, n_s, ok_s, _ = subs[s]
                vlevel, vz = _operands_at(
                    v_rows, v_strides, outer_s, n_s, ok_s, v_cache[4], v_tables, dv, mv, V_BITS, V_QJL, V_INTERLEAVED,
                    PRMT, DOT_DTYPE, SUB_N, BLOCK_DV, BLOCK_MV, V_WORDS,
                )  # fmt: skip
                acc = tl.dot(_rows_of(pv, sub, s, SUBSPLITS), vlevel, acc, input_precision=DOT_PRECISION)
                if V_QJL:
                    accq = tl.dot(_rows_of(pr, sub, s, SUBSPLITS), vz, accq, input_precision=DOT_PRECISION)
    acc = acc * v_big
    accq = accq * r_big
    mx = mx * t_scale
    denom = tl.sum(l_keys, axis=1)

    if PAGE:  # a bad block id where this split's keys lie: the split's denominator NaN makes the rows NaN
        denom = tl.where(tl.sum(bad_ids, axis=0) > 0, float("nan"), denom)
    part = ((bh * splits + split) * SUBSPLITS + sub) * R + rows
    tl.store(mx_ptr + part, mx, mask=row_ok)
    tl.store(l_ptr + part, denom, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], acc, mask=row_ok[:, None])
    if V_QJL:
        tl.store(accq_ptr + part[:, None] * BLOCK_MV + tl.arange(0, BLOCK_MV)[None, :], accq, mask=row_ok[:, None])


@triton.jit
def attention_combine_kernel(
    partials,  # pass 1's (mx, denom, acc, acc_qjl): (BH, PARTS, R) CDT running maxima; (BH, PARTS, R) CDT
    # denominators; (BH, PARTS, R, BLOCK_DV) CDT rotated-domain value sums; V QJL: (BH, PARTS, R, BLOCK_MV)
    # CDT sums of p rho z
    rot_ptr,  # (BLOCK_DV, BLOCK_DV) CDT V's rotation matrix R_V zero-padded (x = y @ R_V)
    smat_ptr,  # V QJL: (BLOCK_MV, BLOCK_DV) CDT sqrt(pi/2) / mv * S_V zero-padded (scaled on the host)
    out_ptr,  # (BH, R, dv) output in the query dtype (float32 for bfloat16 under the interpreter, see _store_dtype)
    lengths_ptr,  # (batch,) int32 or int64 keys attended to per sequence (any value: see load_length)
    kv_heads,  # KV heads (bh // kv_heads is the batch index)
    N,  # cache length (keys per head)
    least,  # smallest valid length: 1, or q_len with causal masking
    R,  # query rows per KV head
    dv: tl.constexpr,  # value dimension
    V_QJL: tl.constexpr,  # values carry a QJL sketch
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 inputs, else tl.float32
    DOT_PRECISION: tl.constexpr,  # input_precision of the tl.dots: "tf32x3" (float32-accurate) or "ieee"
    parts,  # partial results per query row (key splits x sub-splits)
    BLOCK_Q: tl.constexpr,  # query rows per program (>= 16)
    BLOCK_DV: tl.constexpr,  # power of two >= max(dv, 16)
    BLOCK_C: tl.constexpr,  # output coordinates per chunk: power of two, 16 <= BLOCK_C <= BLOCK_DV
    BLOCK_MV: tl.constexpr,  # power of two >= max(mv, 16)
    OUT_MAX: tl.constexpr,  # the query dtype's largest finite value, where finite outputs saturate
):
    mx_ptr, l_ptr, acc_ptr, accq_ptr = partials
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_DV)
    mcols = tl.arange(0, BLOCK_MV)
    top = tl.full((BLOCK_Q,), float("-inf"), dtype=CDT)
    for s in range(parts):
        top = tl.maximum(top, tl.load(mx_ptr + (bh * parts + s) * R + rows, mask=row_ok, other=0.0))
    denom = tl.zeros((BLOCK_Q,), dtype=CDT)
    y = tl.zeros((BLOCK_Q, BLOCK_DV), dtype=CDT)
    yq = tl.zeros((BLOCK_Q, BLOCK_MV), dtype=CDT)
    for s in range(parts):
        part = (bh * parts + s) * R + rows
        w = tl.exp2(tl.load(mx_ptr + part, mask=row_ok, other=0.0) - top)  # 0 for an empty one
        denom += w * tl.load(l_ptr + part, mask=row_ok, other=0.0)
        y += w[:, None] * tl.load(acc_ptr + part[:, None] * BLOCK_DV + cols[None, :], mask=row_ok[:, None], other=0.0)
        if V_QJL:
            accq = tl.load(accq_ptr + part[:, None] * BLOCK_MV + mcols[None, :], mask=row_ok[:, None], other=0.0)
            yq += w[:, None] * accq
    denom = tl.where(row_ok, denom, 1.0)
    # a length out of least..N (possible only with validate=False) makes every row of the sequence NaN
    length = load_length(lengths_ptr + bh // kv_heads, N)
    denom = tl.where((length >= least) & (length <= N), denom, float("nan"))
    y = y / denom[:, None]
    yq = yq / denom[:, None]
    for c0 in tl.static_range(0, BLOCK_DV, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        x = tl.dot(y, tl.load(rot_ptr + cols[:, None] * BLOCK_DV + cc[None, :]), input_precision=DOT_PRECISION)
        if V_QJL:
            x += tl.dot(yq, tl.load(smat_ptr + mcols[:, None] * BLOCK_DV + cc[None, :]), input_precision=DOT_PRECISION)
        # a finite output past the query dtype's range (values reconstructed past it) saturates; NaN and Inf stay
        x = tl.where((x > OUT_MAX) & (x < float("inf")), OUT_MAX, x)
        x = tl.where((x < -OUT_MAX) & (x > float("-inf")), -OUT_MAX, x)
        out = out_ptr + (bh * R + rows)[:, None] * dv + cc[None, :]
        tl.store(out, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cc < dv)[None, :])
