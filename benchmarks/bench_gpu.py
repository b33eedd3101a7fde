"""GPU pytest-benchmark suite (skipped without CUDA): ``pytest benchmarks/bench_gpu.py --benchmark-only``.

Providers, shapes and the timed step come from chanflex_kernels.bench_gpu;
each call synchronises so host timing covers the GPU work, and extra_info
also records triton.testing.do_bench's median. Group = shape, dtype and mode.
"""
import pytest
import torch

from chanflex_kernels.bench import MODES, NUM_KERNELS, RESNET18_SHAPES
from chanflex_kernels.bench_gpu import BATCH, DTYPES, gpu_step, providers

GPU_READY = torch.cuda.is_available()
if GPU_READY:
    from chanflex_kernels.triton import launch

    GPU_READY = not launch.interpreting()
pytestmark = pytest.mark.skipif(not GPU_READY, reason="needs a CUDA device and TRITON_INTERPRET unset")
PROVIDERS = list(providers()) if GPU_READY else ["static", "triton", "batch_as_groups"]
SHAPES = [s.at_batch(BATCH) for s in RESNET18_SHAPES]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_gpu_speed(benchmark, provider, mode, dtype, shape):
    import triton.testing

    step = gpu_step(provider, shape, DTYPES[dtype], mode)
    step()  # autotune outside the timed region

    def synchronised():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"{shape.id} {dtype} {mode}"
    benchmark.extra_info.update(torch=torch.__version__, device=torch.cuda.get_device_name(), shape=shape.id,
                                num_kernels=NUM_KERNELS, dtype=dtype, provider=provider, mode=mode,
                                do_bench_median_ms=triton.testing.do_bench(step, return_mode="median"))
    benchmark(synchronised)
