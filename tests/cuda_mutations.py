"""Mutation check of the CUDA kernels' tests: plant one bug at a time in the block programs, expect a red run.

    .venv/bin/python tests/cuda_mutations.py      # ~15 min on 2 cores; not part of `make test`

Each mutation is a realistic bug in csrc/cuda/block_programs.h: a missing
barrier, an off-by-one, a dropped stride or offset. The checkout is copied to
a temporary directory, the extension built there without the CUDA kernels
(the tests run the programs' host emulation, which is the same source), and
tests/test_cuda_kernels.py run with -x after each mutation
(tests/mutation_check.py). A mutation that does not compile counts as
caught; one the tests do not catch is reported and the script exits 1.
"""
import os
import pathlib
import subprocess
import sys

from mutation_check import check_mutations

# (what the bug is, text in block_programs.h, the buggy replacement); each text occurs exactly once.
MUTATIONS = [
    ("forward: stage and multiply in one phase (missing barrier)",
     "      }\n      CF_SYNC();\n      CF_THREADS(t) { multiply_step(local(t).acc, sm.w, sm.x, t); }",
     "        multiply_step(local(t).acc, sm.w, sm.x, t);\n      }"),
    ("grad_x: no barrier after the multiply step",
     "      CF_THREADS(t) { multiply_step(local(t).acc, sm.w, sm.g, t); }\n      CF_SYNC();",
     "      CF_THREADS(t) { multiply_step(local(t).acc, sm.w, sm.g, t); }"),
    ("weight side: no barrier before the lane sums",
     "      CF_SYNC();\n      CF_THREADS(t) {\n        if (t < KC * kReduceLanes) {",
     "      CF_THREADS(t) {\n        if (t < KC * kReduceLanes) {"),
    ("mix: last kernel dropped", "k < g.num_kernels; ++k) {", "k + 1 < g.num_kernels; ++k) {"),
    ("im2col: dilation dropped on w", "s * g.dil_w;", "s;"),
    ("im2col: bottom edge off by one", "ih < 0 || ih >= g.height", "ih < 0 || ih > g.height"),
    ("forward: bias of group 0's channel", "p.bias + channel", "p.bias + o"),
    ("forward: output pixel bound off by one", "if (pixel < g.out_pixels()) {", "if (pixel <= g.out_pixels()) {"),
    ("grad_x: stride phase test dropped", "h % g.stride_h || ", ""),
    ("grad_x: last column of each tile not stored", "if (pixel < g.in_pixels()) {",
     "if (pixel < g.in_pixels() && col + j != BN - 1) {"),
    ("weight side: last sample of each slice skipped", "for (int64_t b = b_begin; b < b_end; ++b)",
     "for (int64_t b = b_begin; b + 1 < b_end; ++b)"),
    ("weight side: dattn lane sums one lane short", "for (int lane = 0; lane < kReduceLanes; ++lane)",
     "for (int lane = 1; lane < kReduceLanes; ++lane)"),
    ("weight side: dW of the kernel pass's first kernel only", "l.dw[kc][i][j] += a * l.acc[i][j];",
     "l.dw[0][i][j] += a * l.acc[i][j];"),
    ("weight side: dW without the group offset",
     "k_stride + (group * g.group_out + o) * cols + q] =",
     "k_stride + o * cols + q] ="),
    ("weight side: every split's dW stored in the first slab",
     "p.grad_weight[(split * g.num_kernels + k) * k_stride",
     "p.grad_weight[k * k_stride"),
]


def build_without_cuda(copy: pathlib.Path) -> bool:
    """Build the copy's extension in place, CPU kernels and host emulation only."""
    env = {**os.environ, "CHANFLEX_SKIP_CUDA": "1",
           "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # ninja
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy, env=env,
                          capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(check_mutations("csrc/cuda/block_programs.h", MUTATIONS, "tests/test_cuda_kernels.py",
                             build=build_without_cuda, env={"CHANFLEX_SKIP_CUDA": "1"}))
