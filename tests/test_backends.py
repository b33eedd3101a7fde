"""Backend selection: set_backend, use_backend, CHANFLEX_BACKEND."""
import os
import subprocess
import sys

import pytest
import torch

import chanflex_kernels
from chanflex_kernels import dynamic_conv2d


@pytest.fixture
def count_reference_calls(monkeypatch):
    calls = []
    original = chanflex_kernels.ops.dynamic_conv2d_reference

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chanflex_kernels.ops, "dynamic_conv2d_reference", spy)
    return calls


def _run():
    x, w, a = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 3, 3, 3), torch.randn(2, 2)
    return dynamic_conv2d(x, w, a)


def test_default_is_auto_and_compiled(count_reference_calls):
    assert chanflex_kernels.get_backend() == "auto"
    _run()
    assert count_reference_calls == []


def test_use_backend_restores_previous(count_reference_calls):
    with chanflex_kernels.use_backend("reference"):
        assert chanflex_kernels.get_backend() == "reference"
        _run()
    assert chanflex_kernels.get_backend() == "auto"
    assert count_reference_calls == [1]
    with pytest.raises(RuntimeError):
        with chanflex_kernels.use_backend("cpp"):
            raise RuntimeError("inside")
    assert chanflex_kernels.get_backend() == "auto"


def test_set_backend(count_reference_calls):
    try:
        chanflex_kernels.set_backend("reference")
        _run()
        chanflex_kernels.set_backend("cpp")
        _run()
    finally:
        chanflex_kernels.set_backend("auto")
    assert count_reference_calls == [1]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"expected one of \('auto', 'cpp', 'triton', 'cuda', 'reference'\), got 'cudnn'"):
        chanflex_kernels.set_backend("cudnn")
    assert chanflex_kernels.get_backend() == "auto"


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_environment_variable():
    done = _python("import chanflex_kernels as c; print(c.get_backend())", CHANFLEX_BACKEND="reference")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference"
    done = _python("import chanflex_kernels", CHANFLEX_BACKEND="fast")
    assert done.returncode != 0
    assert "environment variable CHANFLEX_BACKEND: expected one of ('auto', 'cpp', 'triton', 'cuda', 'reference'), got 'fast'" in done.stderr
