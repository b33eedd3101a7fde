"""Triton kernels of dynamic_conv2d: implicit GEMMs with per-sample mixed weights.

Shapes (all strides in elements, any layout)::

    x     (B, C_in, H, W)            attn  (B, K)
    W     (K, C_out, C_in/G, KH, KW) bias  (K, C_out)
    y, dy (B, C_out, OH, OW)         G = groups, GI = C_in/G, GO = C_out/G

Design: fused mixing. Wherever a kernel needs sample b's weight tile it loads
the K kernels' tiles and mixes them with attn[b] in fp32 registers, then feeds
the tile to ``tl.dot``. No (B, |W|) tensor exists. The mixing costs K FMAs per
weight element per tile, against BLOCK_M per element for the dot: K/BLOCK_M of
the tensor-core work, done on the CUDA cores, plus K times the weight traffic,
which is served from L2 (the K kernels of one layer are a few MB at most).

Loop order: the kernel taps (kh, kw) outside, channel chunks inside, so the
spatial index math is done once per tap on BLOCK_M-vectors rather than on
(BLOCK_M x BLOCK_K) tiles; that keeps the tiles free of register spills.
With ``STATIC_K`` (K <= 8) the mixing loop is unrolled, which leaves the
channel loop innermost so Triton can software-pipeline its loads.

Every program id is cast to int64 before it enters pointer arithmetic, so
batch offsets never overflow; ``INDEX_64`` also widens the in-sample index
vectors, for tensors whose single sample spans 2**31 elements or more.

Precision: loads in the input dtype, accumulation in fp32, ``tl.dot`` with
``DOT_PRECISION`` ("tf32" when torch allows TF32 for cuDNN convs, the same
rule F.conv2d follows; "ieee" otherwise); half types feed the dot in their own
dtype after the fp32 mix. ``UPCAST_DOT`` exists for Triton's CPU interpreter
only, whose ``tl.dot`` multiplies the raw bit patterns of bfloat16 tiles: there
the (already bf16-rounded) tiles are widened to fp32 just for the product.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mixed_tile(W_tile_ptrs, mask, A_row_ptr, stride_ak, stride_wk, K,
                STATIC_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """sum_k attn[b, k] * W[k][tile] in fp32; ``W_tile_ptrs`` point into kernel 0, ``A_row_ptr`` at attn[b, 0]."""
    w_mix = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if STATIC_K > 0:
        for k in tl.static_range(STATIC_K):
            a_k = tl.load(A_row_ptr + k * stride_ak).to(tl.float32)
            w_mix += a_k * tl.load(W_tile_ptrs + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
    else:
        for k in range(K):
            a_k = tl.load(A_row_ptr + k * stride_ak).to(tl.float32)
            w_mix += a_k * tl.load(W_tile_ptrs + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
    return w_mix


@triton.jit
def _accumulate_channel_chunks(acc, pix_ptrs, pix_ok, stride_chunk, w_tap, stride_w_chunk, n_mask, num_chunk,
                               a_row, stride_ak, stride_wk, K, STATIC_K: tl.constexpr, INDEX_64: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tap of an implicit GEMM: acc += A @ Wmix over channel chunks of BLOCK_K.

    A[m, j] = *(pix_ptrs[m] + j * stride_chunk) where pix_ok[m] (the gathered
    input or output-gradient pixels); Wmix[j, n] = sum_k attn[b, k] *
    *(w_tap[n] + j * stride_w_chunk + k * stride_wk), for j < num_chunk.
    """
    for j0 in range(0, num_chunk, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        if INDEX_64:
            j = j.to(tl.int64)
        j_ok = j < num_chunk
        a_tile = tl.load(pix_ptrs[:, None] + j[None, :] * stride_chunk, mask=pix_ok[:, None] & j_ok[None, :],
                         other=0.0)
        w_mix = _mixed_tile(w_tap + j[:, None] * stride_w_chunk, j_ok[:, None] & n_mask[None, :], a_row,
                            stride_ak, stride_wk, K, STATIC_K, BLOCK_K, BLOCK_N)
        acc = _tile_dot(a_tile, w_mix.to(a_tile.dtype), acc, DOT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _dynconv_fwd_kernel(
    X_ptr, W_ptr, A_ptr, Bias_ptr, Y_ptr,
    H, W, OH, OW, K, GROUPS, GI, GO,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wo, stride_wc, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_biask, stride_biaso,
    stride_yb, stride_yc, stride_yh, stride_yw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, STATIC_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    INDEX_64: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, g*GO+n, oh, ow] = sum_{kh, kw, c} x[b, g*GI+c, ih, iw] * Wmix_b[g*GO+n, c, kh, kw] + bias_b[g*GO+n].

    Implicit GEMM per (sample, group): M = OH*OW output pixels, N = GO output
    channels, reduction over (kh, kw, c), with ih = oh*SH - PH + kh*DH (same
    for w) and Wmix_b = sum_k attn[b, k] W[k].
    Grid: (cdiv(OH*OW, BLOCK_M), cdiv(GO, BLOCK_N), B*G).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_bg = tl.program_id(2).to(tl.int64)
    b = pid_bg // GROUPS
    g = pid_bg % GROUPS

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if not INDEX_64:  # the tile indices fit int32; the int64 program ids only move the base pointers
        m = m.to(tl.int32)
        n = n.to(tl.int32)
    m_mask = m < OH * OW
    n_mask = n < GO
    oh = m // OW
    ow = m % OW

    x_base = X_ptr + b * stride_xb + g * GI * stride_xc
    w_n = W_ptr + (g * GO + n[None, :]) * stride_wo
    a_row = A_ptr + b * stride_ab

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_pix = x_base + ih * stride_xh + iw * stride_xw
        w_tap = w_n + kh * stride_wh + kw * stride_ww
        acc = _accumulate_channel_chunks(acc, x_pix, pix_ok, stride_xc, w_tap, stride_wc, n_mask, GI, a_row,
                                         stride_ak, stride_wk, K, STATIC_K, INDEX_64, DOT_PRECISION, UPCAST_DOT,
                                         BLOCK_N, BLOCK_K)

    if HAS_BIAS:
        bias_mix = _mixed_tile(Bias_ptr + (g * GO + n[None, :]) * stride_biaso, n_mask[None, :], a_row,
                               stride_ak, stride_biask, K, STATIC_K, 1, BLOCK_N)
        acc += bias_mix

    y_ptrs = (Y_ptr + b * stride_yb + (g * GO + n[None, :]) * stride_yc
              + oh[:, None] * stride_yh + ow[:, None] * stride_yw)
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dynconv_bwd_data_kernel(
    DY_ptr, W_ptr, A_ptr, DX_ptr,
    H, W, OH, OW, K, GROUPS, GI, GO,
    stride_dyb, stride_dyc, stride_dyh, stride_dyw,
    stride_wk, stride_wo, stride_wc, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_dxb, stride_dxc, stride_dxh, stride_dxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, STATIC_K: tl.constexpr, INDEX_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[b, g*GI+c, ih, iw] = sum_{kh, kw, o} dy[b, g*GO+o, oh, ow] * Wmix_b[g*GO+o, c, kh, kw].

    Transposed implicit GEMM per (sample, group): M = H*W input pixels,
    N = GI input channels, reduction over (kh, kw, o). Input pixel (ih, iw)
    meets output pixel (oh, ow) through tap (kh, kw) when
    ih + PH - kh*DH = oh*SH (and likewise for w); other taps are masked.
    Grid: (cdiv(H*W, BLOCK_M), cdiv(GI, BLOCK_N), B*G).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_bg = tl.program_id(2).to(tl.int64)
    b = pid_bg // GROUPS
    g = pid_bg % GROUPS

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if not INDEX_64:
        m = m.to(tl.int32)
        n = n.to(tl.int32)
    m_mask = m < H * W
    n_mask = n < GI
    ih = m // W
    iw = m % W

    dy_base = DY_ptr + b * stride_dyb + g * GO * stride_dyc
    w_c = W_ptr + g * GO * stride_wo + n[None, :] * stride_wc
    a_row = A_ptr + b * stride_ab

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        th = ih + PH - kh * DH
        tw = iw + PW - kw * DW
        oh = th // SH
        ow = tw // SW
        # Negative th/tw are masked, so it does not matter whether // floors or truncates them.
        pix_ok = (m_mask & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (oh < OH) & (ow < OW))
        dy_pix = dy_base + oh * stride_dyh + ow * stride_dyw
        w_tap = w_c + kh * stride_wh + kw * stride_ww
        acc = _accumulate_channel_chunks(acc, dy_pix, pix_ok, stride_dyc, w_tap, stride_wo, n_mask, GO, a_row,
                                         stride_ak, stride_wk, K, STATIC_K, INDEX_64, DOT_PRECISION, UPCAST_DOT,
                                         BLOCK_N, BLOCK_K)

    dx_ptrs = (DX_ptr + b * stride_dxb + (g * GI + n[None, :]) * stride_dxc
               + ih[:, None] * stride_dxh + iw[:, None] * stride_dxw)
    tl.store(dx_ptrs, acc.to(DX_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dynconv_bwd_weight_kernel(
    X_ptr, DY_ptr, W_ptr, A_ptr, DW_ptr, DATTN_ptr,
    B, H, W, OH, OW, K, GROUPS, GI, GO, SAMPLES_PER_SLICE, NUM_SLICES,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dyb, stride_dyc, stride_dyh, stride_dyw,
    stride_wk, stride_wo, stride_wc, stride_wh, stride_ww,
    stride_ab, stride_ak,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, NEED_DW: tl.constexpr, NEED_DATTN: tl.constexpr,
    INDEX_64: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_KMIX: tl.constexpr,
):
    """Per-sample weight gradients G_b, reduced on the fly into dW and dattn.

    G_b[o, c, kh, kw] = sum_p dy[b, g*GO+o, p] * x[b, g*GI+c, ih(p, kh), iw(p, kw)]   (p = output pixel)
    dW[k]      = sum_b attn[b, k] G_b          -> DW_ptr    (NUM_SLICES, K, C_out, GI*KH*KW) fp32
    dattn[b, k] = <G_b, W[k]> (this tile's share) -> DATTN_ptr (rows, B, K) fp32

    A program owns one tap (kh, kw), an (o, c) tile of one group, the kernels
    k in [kc*BLOCK_KMIX, (kc+1)*BLOCK_KMIX) and one slice of samples; it holds
    that tile of G_b for one sample at a time, so no (B, |W|) tensor exists.
    The host sums DW over slices and DATTN over rows (deterministic, no atomics).
    DATTN has one row per 16x16 (o, c) block of each tap, whatever the tile
    size: a program writes its share into its first block's row and zeros into
    its other blocks' rows, so every row is written by exactly one program and
    the workspace needs no zeroing, even between autotuning trials.
    Grid: (cdiv(GO, BLOCK_O), cdiv(GI, BLOCK_C) * KH*KW, G * NUM_SLICES * cdiv(K, BLOCK_KMIX)).
    """
    pid_o = tl.program_id(0).to(tl.int64)
    pid_ct = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2).to(tl.int64)
    num_kc = tl.cdiv(K, BLOCK_KMIX)
    kc = pid_z % num_kc
    s = (pid_z // num_kc) % NUM_SLICES
    g = pid_z // (num_kc * NUM_SLICES)
    tap = pid_ct % (KH * KW)
    kh = tap // KW
    kw = tap % KW

    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c = (pid_ct // (KH * KW)) * BLOCK_C + tl.arange(0, BLOCK_C)
    if not INDEX_64:
        o = o.to(tl.int32)
        c = c.to(tl.int32)
    o_mask = o < GO
    c_mask = c < GI
    k = kc * BLOCK_KMIX + tl.arange(0, BLOCK_KMIX)
    k_mask = k < K
    mask3 = k_mask[:, None, None] & o_mask[None, :, None] & c_mask[None, None, :]

    if NEED_DATTN:
        w_ptrs = (W_ptr + k[:, None, None] * stride_wk + (g * GO + o)[None, :, None] * stride_wo
                  + c[None, None, :] * stride_wc + kh * stride_wh + kw * stride_ww)
        SUB_O: tl.constexpr = BLOCK_O // 16
        SUB_C: tl.constexpr = BLOCK_C // 16
        sub = tl.arange(0, SUB_O * SUB_C)
        o16 = pid_o * SUB_O + sub // SUB_C
        c16 = (pid_ct // (KH * KW)) * SUB_C + sub % SUB_C
        rows = ((g * tl.cdiv(GO, 16) + o16) * tl.cdiv(GI, 16) + c16) * (KH * KW) + tap
        row_mask = (o16 < tl.cdiv(GO, 16)) & (c16 < tl.cdiv(GI, 16))
        row_mask = row_mask[:, None] & k_mask[None, :]
    dw_acc = tl.zeros((BLOCK_KMIX, BLOCK_O, BLOCK_C), dtype=tl.float32)

    P = OH * OW
    b_start = s * SAMPLES_PER_SLICE
    b_end = tl.minimum(b_start + SAMPLES_PER_SLICE, B)
    for b in range(b_start, b_end):
        x_base = X_ptr + b * stride_xb + (g * GI + c[None, :]) * stride_xc
        dy_base = DY_ptr + b * stride_dyb + (g * GO + o[:, None]) * stride_dyc
        grad_tile = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            if INDEX_64:
                p = p.to(tl.int64)
            p_mask = p < P
            oh = p // OW
            ow = p % OW
            dy_tile = tl.load(dy_base + (oh * stride_dyh + ow * stride_dyw)[None, :],
                              mask=o_mask[:, None] & p_mask[None, :], other=0.0)
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            pix_ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tile = tl.load(x_base + (ih * stride_xh + iw * stride_xw)[:, None],
                             mask=pix_ok[:, None] & c_mask[None, :], other=0.0)
            grad_tile = _tile_dot(dy_tile, x_tile, grad_tile, DOT_PRECISION, UPCAST_DOT)
        a = tl.load(A_ptr + b * stride_ab + k * stride_ak, mask=k_mask, other=0.0).to(tl.float32)
        if NEED_DW:
            dw_acc += a[:, None, None] * grad_tile[None, :, :]
        if NEED_DATTN:
            # Re-read per sample (an L1/L2 hit) rather than held: registers go to the accumulators.
            w3 = tl.load(w_ptrs, mask=mask3, other=0.0).to(tl.float32)
            share = tl.sum(tl.sum(w3 * grad_tile[None, :, :], axis=2), axis=1)
            values = tl.where((sub == 0)[:, None], share[None, :], 0.0)
            tl.store(DATTN_ptr + (rows[:, None] * B + b) * K + k[None, :], values, mask=row_mask)

    if NEED_DW:
        C_out = GROUPS * GO
        R = GI * KH * KW
        dw_ptrs = (DW_ptr + ((s * K + k[:, None, None]) * C_out + (g * GO + o)[None, :, None]) * R
                   + c[None, None, :] * (KH * KW) + tap)
        tl.store(dw_ptrs, dw_acc, mask=mask3)


@triton.jit
def _dynconv_bwd_bias_kernel(
    DY_ptr, OUT_ptr, C_out, OH, OW,
    stride_dyb, stride_dyc, stride_dyh, stride_dyw,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per-sample bias gradient: OUT[b, o] = sum_p dy[b, o, p], fp32 (B, C_out).

    The host turns it into grad_bias = attn^T OUT and dattn += OUT bias^T,
    two (B, K, C_out) products. Grid: (B, cdiv(C_out, BLOCK_C)).
    """
    b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_mask = o < C_out
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    P = OH * OW
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ptrs = (DY_ptr + b * stride_dyb + o[:, None] * stride_dyc + (p // OW)[None, :] * stride_dyh
                + (p % OW)[None, :] * stride_dyw)
        acc += tl.sum(tl.load(ptrs, mask=o_mask[:, None] & (p < P)[None, :], other=0.0).to(tl.float32), axis=1)
    tl.store(OUT_ptr + b * C_out + o, acc, mask=o_mask)
