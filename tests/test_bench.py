"""The CPU benchmark's machinery: the CPU round-trip probe and the ratio table."""
import math
import os
import subprocess
import sys

import pytest
import torch

import chanflex_kernels  # noqa: F401  (registers the ops)
from chanflex_kernels.bench import ConvShape, Row, cpu_round_trip_ns, markdown, measure


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def test_round_trip_is_a_plausible_time_with_two_cpus():
    ns = torch.ops.chanflex.cpu_core_round_trip_ns(2000, 2)
    if _cpus() < 2:
        assert math.isnan(ns)
        return
    # A cache line's round trip between two cores takes tens to hundreds of
    # ns; a microsecond per trip would mean the two threads shared one CPU.
    assert 1.0 < ns < 20_000.0, ns


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_round_trip_is_nan_on_one_cpu():
    cpu = min(os.sched_getaffinity(0))
    code = ("import os, torch, chanflex_kernels\n"
            f"os.sched_setaffinity(0, {{{cpu}}})\n"
            "print(torch.ops.chanflex.cpu_core_round_trip_ns(100, 1))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert math.isnan(float(done.stdout.split()[-1]))


@pytest.mark.parametrize("iterations, repeats, message", [(0, 1, "iterations must be positive, got 0"),
                                                         (10, -2, "repeats must be positive, got -2")])
def test_round_trip_rejects_bad_counts(iterations, repeats, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.chanflex.cpu_core_round_trip_ns(iterations, repeats)


def test_measure_records_the_round_trip_around_each_row():
    tiny = ConvShape("tiny", 2, 4, 6, 6)
    rows = measure([tiny], modes=("fwd",), peers=("batch_as_groups",), repeats=1, memory=False)
    assert len(rows) == 1 and rows[0].round_trip_ns is not None
    before, after = rows[0].round_trip_ns
    assert (math.isnan(before) and math.isnan(after)) if _cpus() < 2 else (before > 0 and after > 0)
    assert cpu_round_trip_ns() > 0 or _cpus() < 2


def test_markdown_shows_the_round_trip_column():
    row = Row("s", "fwd", 2.0, 1.0, "batch_as_groups", 4.0, round_trip_ns=(190.4, 560.6))
    table = markdown([row, Row("t", "fwd", 2.0, 1.0, "batch_as_groups", 4.0)])
    header, _, first, second = table.splitlines()
    assert header.endswith("| CPU round trip ns |")
    assert first.endswith("| 190/561 |") and "| 0.50 |" in first and "| 4.00 |" in first
    assert second.endswith("| - |")
