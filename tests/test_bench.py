"""The CPU benchmark's machinery: the CPU round-trip probe, the ratio table, the targets check and the plot."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import chanflex_kernels  # noqa: F401  (registers the ops)
from chanflex_kernels.bench import (CPU_TARGETS, DEPTHWISE_SHAPES, DTYPES, QUICK_SHAPES, SHAPES, ConvShape, Row, Step,
                                    check_targets, cpu_round_trip_ns, fwd_bwd_floor_mb, load_rows, markdown, measure,
                                    plot, select_shapes, shape_by_id, shape_name_and_batch, targets_markdown)
from chanflex_kernels.bench import main as bench_main


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


# ---------------------------------------------------------------------------
# The targets check, the saved-run report and the plot.

def _row(name, mode, ours_over_static, peer_over_ours=3.0, memory=None, batch=32, dtype="float32"):
    shape = next(s for s in SHAPES if s.name == name).at_batch(batch)
    static_peak = None if memory is None else 10.0
    return Row(shape.id, mode, 10.0, 10.0 * ours_over_static, "batch_as_groups",
               10.0 * ours_over_static * peer_over_ours, static_peak,
               None if memory is None else 10.0 * memory, dtype=dtype)


def _check(checks, label_start):
    return next(c for c in checks if c.target.label.startswith(label_start))


def test_targets_count_the_rows_met_and_name_the_misses():
    rows = [_row("resnet18.layer1", "fwd", 1.30), _row("resnet18.layer1", "fwd+bwd", 1.50, memory=0.6),
            _row("resnet18.layer3", "fwd", 1.31, peer_over_ours=1.99),
            _row("resnet18.layer3", "fwd+bwd", 1.51, peer_over_ours=2.0, memory=1.2),
            _row("resnet18.layer4", "fwd+bwd", 0.9, peer_over_ours=5.0, memory=1.83),
            _row("resnet18.layer2", "fwd", 9.0, peer_over_ours=0.1, batch=1)]  # batch 1: no target
    checks = check_targets(rows)
    fwd = _check(checks, "fwd chanflex")
    assert len(fwd.values) == 2 and [m[:2] for m in fwd.misses] == [("resnet18.layer3", 1.31)]  # 1.30 meets 1.3
    assert fwd.worst == ("resnet18.layer3", 1.31)
    fb = _check(checks, "fwd+bwd")
    assert [m[0] for m in fb.misses] == ["resnet18.layer3"] and len(fb.values) == 3
    peers = _check(checks, "best peer")  # only 256@14 and 512@7, both modes
    assert sorted(label for label, _ in peers.values) == ["resnet18.layer3 fwd", "resnet18.layer3 fwd+bwd",
                                                           "resnet18.layer4 fwd+bwd"]
    assert [m[:2] for m in peers.misses] == [("resnet18.layer3 fwd", pytest.approx(1.99))]
    assert peers.worst[0] == "resnet18.layer3 fwd"
    memory = _check(checks, "peak memory")
    assert [m[0] for m in memory.misses] == ["resnet18.layer4"]
    # the miss carries its floor: (36 + 2 x 3.0625 MiB) over the static conv's 10 MiB
    assert memory.misses[0][2] == pytest.approx(4.2125)
    table = targets_markdown(checks)
    assert "| fwd chanflex/static <= 1.3 | 1 of 2 | 1.31 (resnet18.layer3) | resnet18.layer3 1.31 |" in table
    assert "resnet18.layer4 1.83 (floor 4.21)" in table


def test_targets_without_rows_at_batch_32_say_so():
    table = targets_markdown(check_targets([_row("resnet18.layer3", "fwd", 1.0, batch=8)]))
    assert table.count("no measured rows (batch 32 float32, its layers)") == len(CPU_TARGETS)
    # a --shapes run without the peer target's layers (256@14, 512@7) and without fwd+bwd rows
    table = targets_markdown(check_targets([_row("resnet18.layer1", "fwd", 1.0)]))
    assert "| fwd chanflex/static <= 1.3 | 1 of 1 |" in table
    assert table.count("no measured rows (batch 32 float32, its layers)") == len(CPU_TARGETS) - 1


def test_targets_read_only_float32_rows():
    """The targets are set in float32: a bfloat16 run's rows are reported, not checked."""
    rows = [_row("resnet18.layer3", "fwd", 2.0, peer_over_ours=1.0, dtype="bfloat16"),
            _row("resnet18.layer3", "fwd+bwd", 2.0, memory=3.0, dtype="bfloat16")]
    table = targets_markdown(check_targets(rows))
    assert table.count("no measured rows (batch 32 float32, its layers)") == len(CPU_TARGETS)
    rows.append(_row("resnet18.layer3", "fwd", 1.31))
    assert "| fwd chanflex/static <= 1.3 | 0 of 1 | 1.31 (resnet18.layer3) |" in targets_markdown(check_targets(rows))


def test_fwd_bwd_floor_is_output_grad_x_and_all_kernels_gradients():
    layer4 = next(s for s in SHAPES if s.name == "resnet18.layer4")  # 512@7, batch 32
    # K |W| = 4 x 512 x 512 x 9 floats = 36 MiB; output and grad_x 32 x 512 x 49 floats = 3.0625 MiB each
    assert fwd_bwd_floor_mb(layer4) == pytest.approx(36 + 2 * 3.0625)
    stem = next(s for s in SHAPES if s.name == "resnet18.conv1")  # 3->64, 7x7 stride 2, 224 -> 112
    assert fwd_bwd_floor_mb(stem.at_batch(2)) * 2**20 / 4 == 2 * 64 * 112 ** 2 + 2 * 3 * 224 ** 2 + 4 * 64 * 3 * 49
    assert fwd_bwd_floor_mb(layer4, dtype="bfloat16") == pytest.approx((36 + 2 * 3.0625) / 2)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_shape_ids_round_trip(batch):
    for shape in SHAPES + DEPTHWISE_SHAPES:
        assert shape_by_id(shape.at_batch(batch).id) == shape.at_batch(batch)


@pytest.mark.parametrize("shape_id, message", [
    ("resnet18.layer3", "expected a shape id like"),
    ("resnet18.layer9-B32-C256-O256-14x14-k3-s1", "expected the id of a benchmark shape"),
    ("resnet18.layer3-B32-C256-O512-14x14-k3-s1", "expected the id of a benchmark shape")])
def test_shape_by_id_rejects_other_ids(shape_id, message):
    with pytest.raises(ValueError, match=message):
        shape_by_id(shape_id)


def test_select_shapes_keeps_the_named_layers_in_table_order():
    assert [s.name for s in select_shapes(" vgg19.conv5_x,resnet18.layer3 ,")] == ["resnet18.layer3", "vgg19.conv5_x"]
    assert select_shapes(",".join(s.name for s in SHAPES)) == SHAPES


@pytest.mark.parametrize("names, message", [
    ("resnet18.layer9,resnet18.layer3", "got resnet18.layer9"),
    ("resnet18.layer3-B32-C256-O256-14x14-k3-s1", "got resnet18.layer3-B32"),
    (" , ", "got ' , '")])
def test_select_shapes_rejects_other_names(names, message):
    with pytest.raises(ValueError, match="expected comma-separated layer names from resnet18.conv1, ") as info:
        select_shapes(names)
    assert message in str(info.value)


def _save(rows, path):
    path.write_text(json.dumps([asdict(r) for r in rows]))
    return str(path)


def test_report_of_a_saved_run_prints_table_targets_and_draws_the_plot(tmp_path, capsys):
    rows = [_row("resnet18.layer3", mode, 0.8, memory=1.2) for mode in ("fwd", "fwd+bwd")]
    rows += [_row("resnet18.layer4", mode, 1.1, memory=1.8) for mode in ("fwd", "fwd+bwd")]
    rows += [_row("resnet18.layer4", "fwd", 1.4, batch=1)]
    rows[0].round_trip_ns = (60.0, 70.0)
    saved = _save(rows, tmp_path / "run.json")
    assert load_rows(saved) == rows
    png = tmp_path / "run.png"
    assert "peak memory" in plot(rows, str(png))[-1]
    bench_main(["--from-json", saved, "--plot", str(png)])
    out = capsys.readouterr().out
    assert f"rows of {saved}" in out and "| resnet18.layer4-B1-C512-O512-7x7-k3-s1 | fwd |" in out
    assert "| peak memory fwd+bwd chanflex/static <= 1.5 | 1 of 2 | 1.80 (resnet18.layer4) |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a non-empty JSON list of rows"),
    ("[]", "expected a non-empty JSON list of rows"),
    ('[{"shape": "resnet18.layer3-B32-C256-O256-14x14-k3-s1", "mode": "fwd"}]', "missing \\['static_ms'"),
    ('[{"shape": "x", "mode": "fwd", "static_ms": 1, "chanflex_ms": 1, "best_peer": "p", "best_peer_ms": 1}]',
     "expected a shape id like"),
    ('[{"shape": "resnet18.layer3-B32-C256-O256-14x14-k3-s1", "mode": "fwd", "static_ms": 1, "chanflex_ms": 1, '
     '"best_peer": "p", "best_peer_ms": 1, "dtype": "float8"}]',
     "row 0: expected dtype in \\('float32', 'bfloat16', 'float16'\\), got 'float8'")])
def test_load_rows_rejects_other_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_rows(str(path))


@pytest.mark.parametrize("argv, message", [
    (["--from-json", "run.json", "--quick", "--batch", "8"],
     "--from-json reports a saved run; it takes only --plot, got --quick --batch"),
    (["--from-json", "missing.json"], "No such file"),
    (["--batch", "0"], "expected a positive integer, got 0"),
    (["--from-json", "run.json", "--shapes", "resnet18.layer3"], "it takes only --plot, got --shapes"),
    (["--from-json", "run.json", "--dtype", "bfloat16"], "it takes only --plot, got --dtype"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--quick", "--shapes", "resnet18.layer3"], "--quick, --shapes and --depthwise each pick the layers"),
    (["--depthwise", "--shapes", "resnet18.layer3"], "--quick, --shapes and --depthwise each pick the layers"),
    (["--from-json", "run.json", "--depthwise"], "it takes only --plot, got --depthwise"),
    (["--shapes", "resnet18.layer5"], "--shapes: expected comma-separated layer names"),
    (["--shapes", ""], "--shapes: expected comma-separated layer names"),
    (["--repeats", "-1"], "expected a positive integer, got -1")])
def test_bench_rejects_bad_arguments(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_measures_the_depthwise_shapes_outside_the_targets(tmp_path, capsys):
    saved = tmp_path / "dw.json"
    bench_main(["--depthwise", "--batch", "2", "--no-memory", "--repeats", "1", "--json", str(saved)])
    rows = load_rows(str(saved))
    assert [shape_name_and_batch(r.shape) for r in rows if r.mode == "fwd"] == [(s.name, 2) for s in DEPTHWISE_SHAPES]
    assert all(r.shape.endswith(f"-g{shape_by_id(r.shape).in_channels}") for r in rows)
    assert all(r.static_ms > 0 and r.chanflex_ms > 0 and r.best_peer_ms > 0 for r in rows)
    # At batch 32 too, the targets (set on ResNet18 and VGG19) apply to none of them.
    at_32 = [Row(**{**asdict(r), "shape": shape_by_id(r.shape).at_batch(32).id}) for r in rows]
    assert all(not check.values for check in check_targets(at_32))
    assert capsys.readouterr().out.count("no measured rows (batch 32 float32, its layers)") == len(CPU_TARGETS)


def test_bench_runs_the_shapes_at_another_batch(tmp_path, capsys):
    saved = tmp_path / "b2.json"
    bench_main(["--quick", "--batch", "2", "--no-memory", "--repeats", "1", "--json", str(saved)])
    rows = load_rows(str(saved))
    assert [shape_name_and_batch(r.shape) for r in rows if r.mode == "fwd"] == [(s.name, 2) for s in QUICK_SHAPES]
    assert all(r.static_ms > 0 and r.chanflex_ms > 0 and r.memory_ratio is None for r in rows)
    out = capsys.readouterr().out
    assert out.count("no measured rows (batch 32 float32, its layers)") == len(CPU_TARGETS)
    assert "the rows above; --quick: 1 repeat and one peer, the full run 5 and 3):" in out
    png = tmp_path / "b2.png"
    panels = plot(rows, str(png))  # no peak memory measured: no memory panel
    assert len(panels) == 2 and "peak memory" not in " ".join(panels)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_measures_only_the_chosen_layers(tmp_path, capsys):
    saved = tmp_path / "two.json"
    bench_main(["--shapes", "vgg19.conv5_x,resnet18.layer4.down1x1", "--batch", "2", "--batch1", "--no-memory",
                "--repeats", "1", "--json", str(saved)])
    rows = load_rows(str(saved))
    assert [(shape_name_and_batch(r.shape), r.mode) for r in rows] == [
        (("resnet18.layer4.down1x1", 2), "fwd"), (("resnet18.layer4.down1x1", 2), "fwd+bwd"),
        (("vgg19.conv5_x", 2), "fwd"), (("vgg19.conv5_x", 2), "fwd+bwd"),
        (("resnet18.layer4.down1x1", 1), "fwd"), (("vgg19.conv5_x", 1), "fwd")]
    assert {r.best_peer for r in rows} <= {"batch_as_groups", "concat_k", "per_sample_loop"}
    assert "--quick" not in capsys.readouterr().out


def test_bench_runs_every_provider_in_the_chosen_dtype(tmp_path, capsys):
    saved = tmp_path / "bf16.json"
    bench_main(["--shapes", "resnet18.layer4", "--batch", "2", "--dtype", "bfloat16", "--repeats", "1",
                "--json", str(saved)])
    rows = load_rows(str(saved))
    assert [(r.mode, r.dtype) for r in rows] == [("fwd", "bfloat16"), ("fwd+bwd", "bfloat16")]
    assert all(r.static_ms > 0 and r.chanflex_ms > 0 and r.memory_ratio > 0 for r in rows)
    out = capsys.readouterr().out
    assert "threads, bfloat16, K=4" in out
    assert out.count("no measured rows (batch 32 float32, its layers)") == len(CPU_TARGETS)
    bench_main(["--from-json", str(saved)])
    assert f"rows of {saved} (bfloat16)" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_step_runs_the_providers_in_its_dtype(dtype):
    tiny = ConvShape("tiny", 2, 4, 6, 6)
    for provider in ("static", "chanflex", "batch_as_groups", "concat_k", "per_sample_loop"):
        step = Step(provider, tiny, "fwd+bwd", dtype=dtype)
        assert {t.dtype for t in step.inputs.leaves()} == {DTYPES[dtype]}
        step()
        inp = step.inputs
        used = (inp.x, inp.static_weight) if provider == "static" else (inp.x, inp.weight, inp.attn)
        assert all(t.grad is not None and t.grad.dtype == DTYPES[dtype] for t in used), provider
    with pytest.raises(ValueError, match="expected dtype in \\('float32', 'bfloat16', 'float16'\\), got 'int8'"):
        Step("static", tiny, "fwd", dtype="int8")


def test_memory_ratio_is_not_made_of_a_peak_below_resolution():
    # Batch-1 rows on small planes: the static conv's step can read as 0 MB (resident pages are reused).
    tiny = Row("vgg19.conv5_x-B1-C512-O512-5x5-k3-s1", "fwd", 1.2, 3.0, "batch_as_groups", 3.0,
               static_peak_mb=0.0, chanflex_peak_mb=1.09)
    assert tiny.memory_ratio is None
    assert "| 0.0 | 1.1 | - |" in markdown([tiny])
    measured = Row("resnet18.layer4-B32-C512-O512-7x7-k3-s1", "fwd+bwd", 77.7, 94.5, "concat_k", 378.2,
                   static_peak_mb=24.0, chanflex_peak_mb=43.8)
    assert measured.memory_ratio == pytest.approx(43.8 / 24.0)
    assert "| 24.0 | 43.8 | 1.82 |" in markdown([measured])
