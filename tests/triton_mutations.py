"""Mutation check of the Triton tests: break one index computation at a time, expect a red test run.

    .venv/bin/python tests/triton_mutations.py      # ~10 min on 2 cores; not part of `make test`

Each mutation is a realistic indexing bug (a wrong stride, an off-by-one mask,
a missing group offset...). The checkout is copied to a temporary directory,
the mutation applied to the copy's kernels.py, and tests/test_triton.py run
there with -x (tests/mutation_check.py). A mutation the tests do not catch is
reported and the script exits 1.
"""
import sys

from mutation_check import check_mutations

# (what the bug is, text in kernels.py, the buggy replacement); each text occurs exactly once.
MUTATIONS = [
    ("fwd: tap row from the wrong divisor", "    for tap in range(KH * KW):\n        kh = tap // KW\n        kw = tap % KW\n        ih = oh",
     "    for tap in range(KH * KW):\n        kh = tap // KH\n        kw = tap % KW\n        ih = oh"),
    ("fwd: dilation dropped on w", "iw = ow * SW - PW + kw * DW\n        pix_ok = m_mask",
     "iw = ow * SW - PW + kw\n        pix_ok = m_mask"),
    ("fwd: group offset of x uses GO", "x_base = X_ptr + b * stride_xb + g * GI * stride_xc\n    w_n",
     "x_base = X_ptr + b * stride_xb + g * GO * stride_xc\n    w_n"),
    ("fwd: bottom padding edge off by one", "pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)\n        x_pix",
     "pix_ok = m_mask & (ih >= 0) & (ih <= H) & (iw >= 0) & (iw < W)\n        x_pix"),
    ("fwd: weight channel stride swapped with kernel-w stride",
     "w_tap, stride_wc, n_mask, GI,", "w_tap, stride_ww, n_mask, GI,"),
    ("fwd: bias of the wrong kernel", "stride_ak, stride_biask, K, STATIC_K, 1, BLOCK_N)",
     "stride_ak, 0, K, STATIC_K, 1, BLOCK_N)"),
    ("mix: attn column stride ignored", "        for k in tl.static_range(STATIC_K):\n            a_k = tl.load(A_row_ptr + k * stride_ak)",
     "        for k in tl.static_range(STATIC_K):\n            a_k = tl.load(A_row_ptr + k)"),
    ("bwd-data: stride phase test dropped", "(th % SH == 0) & ", ""),
    ("bwd-data: output edge off by one", "(oh < OH) & (ow < OW))", "(oh < OH) & (ow <= OW))"),
    ("bwd-data: weight indexed as if not transposed",
     "w_tap, stride_wo, n_mask, GO,", "w_tap, stride_wc, n_mask, GO,"),
    ("bwd-weight: dattn rows of groups collide", "rows = ((g * tl.cdiv(GO, 16) + o16)", "rows = ((o16)"),
    ("bwd-weight: dattn share written to every block row", "tl.where((sub == 0)[:, None], share[None, :], 0.0)",
     "tl.where((sub >= 0)[:, None], share[None, :], 0.0)"),
    ("bwd-weight: last sample of each slice skipped", "b_end = tl.minimum(b_start + SAMPLES_PER_SLICE, B)",
     "b_end = tl.minimum(b_start + SAMPLES_PER_SLICE - 1, B)"),
    ("bwd-weight: dW stored without the group offset", "+ (g * GO + o)[None, :, None]) * R",
     "+ o[None, :, None]) * R"),
    ("bwd-weight: tap order of dW transposed", "+ c[None, None, :] * (KH * KW) + tap)",
     "+ c[None, None, :] * (KH * KW) + kw * KH + kh)"),
    ("bias: pixel column uses OH", "+ (p % OW)[None, :] * stride_dyw)", "+ (p % OH)[None, :] * stride_dyw)"),
]


if __name__ == "__main__":
    sys.exit(check_mutations("chanflex_kernels/triton/kernels.py", MUTATIONS, "tests/test_triton.py"))
