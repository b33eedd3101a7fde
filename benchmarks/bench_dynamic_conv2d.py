"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

Providers (chanflex, static conv = the floor, and the peers), modes and shapes
come from chanflex_kernels.bench, shared with ``python -m chanflex_kernels.bench``.
Compare ratios within one run; ``--benchmark-group-by=param:shape,param:mode``
puts each shape's providers side by side.
"""
import pytest
import torch

from chanflex_kernels.bench import MODES, NUM_KERNELS, PROVIDERS, SHAPES, make_step


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_dynamic_conv2d(benchmark, provider, mode, shape):
    benchmark.group = f"{shape.id} {mode}"
    benchmark.extra_info.update(torch=torch.__version__, threads=torch.get_num_threads(), shape=shape.id,
                                num_kernels=NUM_KERNELS, dtype="float32", provider=provider, mode=mode)
    benchmark(make_step(provider, shape, mode))
