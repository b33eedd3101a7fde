"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

Providers (chanflex, static conv = the floor, and the peers), modes and shapes
come from chanflex_kernels.bench, shared with ``python -m chanflex_kernels.bench``.
Each benchmark's group is its shape and mode, so a shape's providers are
compared side by side; compare ratios within one run.
"""
import pytest
import torch

from chanflex_kernels.bench import (MODES, NUM_KERNELS, PROVIDERS, SHAPES, Step, cpu_round_trip_ns, machine,
                                    peak_memory_bytes)

BATCH1 = [s.at_batch(1) for s in SHAPES]


def _info(benchmark, provider, mode, shape):
    benchmark.group = f"{shape.id} {mode}"
    benchmark.extra_info.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=machine(),
                                shape=shape.id, num_kernels=NUM_KERNELS, dtype="float32", provider=provider,
                                mode=mode, cpu_round_trip_ns=cpu_round_trip_ns())


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_speed(benchmark, provider, mode, shape):
    _info(benchmark, provider, mode, shape)
    benchmark(Step(provider, shape, mode))


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", BATCH1, ids=lambda s: s.id)
def test_speed_batch1_inference(benchmark, provider, shape):
    _info(benchmark, provider, "fwd", shape)
    benchmark(Step(provider, shape, "fwd"))


@pytest.mark.parametrize("provider", ["static", "chanflex"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_peak_memory(benchmark, provider, shape):
    """Peak resident bytes added by one fwd+bwd step (fresh subprocess), in extra_info."""
    _info(benchmark, provider, "fwd+bwd", shape)
    peak = benchmark.pedantic(peak_memory_bytes, args=(provider, shape, "fwd+bwd"), rounds=1, iterations=1)
    benchmark.extra_info["peak_bytes"] = peak
    if peak is None:
        pytest.skip("peak memory needs Linux /proc")
