"""The compiled (not interpreted) Triton path, checked without a GPU.

Triton compiles ahead of time for sm_80 and sm_90 with its bundled ptxas
(chanflex_kernels/triton/compile_report.py). This catches what the
interpreter cannot: kernels that do not lower, dots that miss the tensor
cores, tile configs that spill registers heavily. Runs in a subprocess
because this test session interprets the kernels (TRITON_INTERPRET=1).
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# Spill stores ptxas may report for a config of the autotune lists (the chosen
# configs measure 0-60 bytes; the first 3-D accumulator design spilled ~2 KB).
MAX_SPILL_BYTES = 128


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "chanflex_kernels.triton.compile_report", "--quick", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    for kernel in ("fwd", "bwd_data", "bwd_weight", "bwd_bias"):
        for arch in (80, 90):
            for dtype in ("fp32", "bf16", "fp16"):
                assert (kernel, arch, dtype) in kernels, f"{kernel} was not compiled for sm_{arch} {dtype}"
    for r in rows:
        is_variant = not r["config"][0].isdigit()  # the flag variants use IEEE fp32 dots: no tensor cores
        if r["kernel"] != "bwd_bias" and not is_variant:
            assert r["tensor_cores"], f"{r}: tl.dot did not lower to mma/wgmma"
        if not is_variant:
            assert r["spill_bytes"] <= MAX_SPILL_BYTES, f"{r}: spills {r['spill_bytes']} bytes"
