"""Compile the Triton kernels for real GPU targets without a GPU, and report their resource use.

    python -m chanflex_kernels.triton.compile_report            # every autotune config, sm_80 and sm_90
    python -m chanflex_kernels.triton.compile_report --quick    # one config per kernel, plus flag variants

Triton compiles ahead of time for a named target (``GPUTarget("cuda", 90, 32)``)
with its bundled ptxas, so the compiled path (not the interpreter) is checked
on machines without a GPU: the kernels lower, ``tl.dot`` becomes tensor-core
instructions (``mma``/``wgmma`` in the PTX), and ``ptxas -v`` gives registers
and spill bytes per config. Needs TRITON_INTERPRET unset (the kernels must be
jitted, not interpreted).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from typing import Dict, List

DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (80, 90)


@dataclasses.dataclass
class Compiled:
    kernel: str
    arch: int
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: bool


def _ptxas_usage(ptx: str, arch: int) -> tuple:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0


def compile_kernel(fn, pointer_dtypes: Dict[str, str], constexprs: Dict[str, object], arch: int,
                   num_warps: int = 4, num_stages: int = 3):
    """triton.compile ``fn`` for sm_<arch>; int arguments as i32, pointers as given (default fp32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, "fp32")
        else:
            signature[name] = "i32"
    source = ASTSource(fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _jobs(quick: bool) -> List[tuple]:
    """(kernel name, fn, pointer dtypes, constexprs, warps, stages, label) for each compile to run."""
    from . import kernels, launch

    jobs = []
    gemm_configs = launch.GEMM_CONFIGS[-1:] if quick else launch.GEMM_CONFIGS
    wgrad_configs = launch.WGRAD_CONFIGS[-1:] if quick else launch.WGRAD_CONFIGS
    for dtype in DTYPES:
        precision = "tf32" if dtype == "fp32" else "ieee"
        common = dict(KH=3, KW=3, INDEX_64=False, DOT_PRECISION=precision, UPCAST_DOT=False)
        for cfg in gemm_configs:
            label = "x".join(str(v) for v in cfg.kwargs.values()) + f" w{cfg.num_warps} s{cfg.num_stages}"
            fwd_ptrs = {n: dtype for n in ("X_ptr", "W_ptr", "A_ptr", "Bias_ptr", "Y_ptr")}
            jobs.append(("fwd", kernels._dynconv_fwd_kernel, fwd_ptrs,
                         dict(common, STATIC_K=4, HAS_BIAS=True, **cfg.kwargs), cfg.num_warps, cfg.num_stages, label))
            data_ptrs = {n: dtype for n in ("DY_ptr", "W_ptr", "A_ptr", "DX_ptr")}
            jobs.append(("bwd_data", kernels._dynconv_bwd_data_kernel, data_ptrs,
                         dict(common, STATIC_K=4, **cfg.kwargs), cfg.num_warps, cfg.num_stages, label))
        for cfg in wgrad_configs:
            label = "x".join(str(v) for v in cfg.kwargs.values()) + f" w{cfg.num_warps} s{cfg.num_stages}"
            ptrs = {n: dtype for n in ("X_ptr", "DY_ptr", "W_ptr", "A_ptr")}
            jobs.append(("bwd_weight", kernels._dynconv_bwd_weight_kernel, ptrs,
                         dict(common, NEED_DW=True, NEED_DATTN=True, BLOCK_KMIX=4, **cfg.kwargs),
                         cfg.num_warps, cfg.num_stages, label))
        jobs.append(("bwd_bias", kernels._dynconv_bwd_bias_kernel, {"DY_ptr": dtype},
                     dict(BLOCK_C=32, BLOCK_P=128), 4, 3, "32x128"))
    if quick:  # the other compile-time branches, once each
        common = dict(KH=3, KW=2, DOT_PRECISION="ieee", UPCAST_DOT=False, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
        jobs.append(("fwd", kernels._dynconv_fwd_kernel, {},
                     dict(common, STATIC_K=0, HAS_BIAS=False, INDEX_64=True), 4, 3, "K runtime, int64, no bias"))
        jobs.append(("bwd_data", kernels._dynconv_bwd_data_kernel, {},
                     dict(common, STATIC_K=0, INDEX_64=True), 4, 3, "K runtime, int64"))
        wgrad = dict(KH=1, KW=1, DOT_PRECISION="ieee", UPCAST_DOT=False, BLOCK_O=32, BLOCK_C=16, BLOCK_P=64,
                     BLOCK_KMIX=8)
        jobs.append(("bwd_weight", kernels._dynconv_bwd_weight_kernel, {},
                     dict(wgrad, NEED_DW=True, NEED_DATTN=False, INDEX_64=True), 4, 3, "dW only, int64"))
        jobs.append(("bwd_weight", kernels._dynconv_bwd_weight_kernel, {},
                     dict(wgrad, NEED_DW=False, NEED_DATTN=True, INDEX_64=False), 4, 3, "dattn only"))
    return jobs


def report(quick: bool = False, archs=ARCHS) -> List[Compiled]:
    from . import launch

    if launch.interpreting():
        raise RuntimeError("compile_report: TRITON_INTERPRET=1 is set; the kernels must be jitted to compile them")
    rows = []
    for arch in archs:
        for name, fn, ptrs, constexprs, warps, stages, label in _jobs(quick):
            compiled = compile_kernel(fn, ptrs, constexprs, arch, warps, stages)
            ptx = compiled.asm["ptx"]
            registers, spills = _ptxas_usage(ptx, arch)
            dtype = next(iter(ptrs.values()), "fp32")
            rows.append(Compiled(name, arch, dtype, label, registers, spills, compiled.metadata.shared,
                                 bool(re.search(r"\b(mma|wgmma)\.", ptx))))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one config per kernel, plus the flag variants")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    rows = report(args.quick)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    print("| kernel | arch | dtype | config | registers | spill bytes | shared bytes | tensor cores |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.config} | {r.registers} | {r.spill_bytes} | "
              f"{r.shared_bytes} | {'yes' if r.tensor_cores else 'no'} |")


if __name__ == "__main__":
    main()
