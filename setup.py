"""Build chanflex_kernels and its compiled extension chanflex_kernels._C.

The extension holds the op schemas (csrc/*.cpp), the CPU kernels
(csrc/cpu/*.cpp) and the host emulation of the CUDA kernels
(csrc/cuda/*.cpp); the CUDA kernels themselves (csrc/cuda/*.cu) are compiled
when torch has CUDA and a CUDA toolkit (nvcc) is found. Environment
variables, printed when the build starts:

    DEBUG=1                compile with -O0 -g
    MAX_JOBS=N             parallel compile jobs (torch's ninja builder)
    FORCE_CUDA=1           build the CUDA kernels (fail, saying why, if that is impossible:
                           torch without CUDA, no toolkit, or one of another major version)
    CHANFLEX_SKIP_CUDA=1   do not build them
    CUDA_HOME=DIR          the toolkit root (found from nvcc on PATH otherwise)
    TORCH_CUDA_ARCH_LIST   GPU archs; default: the visible GPUs', or 8.0;9.0+PTX without one
"""
import glob
import os
import re
import shutil
import subprocess

import torch
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100 and H100 code, PTX for newer GPUs


def _toolkit_root(path):
    """path if it is a CUDA toolkit root (bin/nvcc and libcudart), else None."""
    if not path:
        return None
    has_nvcc = os.access(os.path.join(path, "bin", "nvcc"), os.X_OK)
    has_cudart = any(glob.glob(os.path.join(path, pattern, "libcudart.so*"))
                     for pattern in ("lib64", "lib", "targets/*/lib"))
    return path if has_nvcc and has_cudart else None


def find_cuda_home():
    """The CUDA toolkit root, or None.

    CUDA_HOME or CUDA_PATH if set; else the toolkit of the nvcc on PATH,
    following a wrapper script's `exec .../bin/nvcc` line (torch's own guess
    takes the wrapper's parent directory, which is no toolkit, and the link
    then fails with "cannot find -lcudart"); else /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return _toolkit_root(os.environ[var])
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                candidates += [os.path.dirname(os.path.dirname(m.decode()))
                               for m in re.findall(rb"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    return next((root for root in map(_toolkit_root, candidates) if root), None)


def extra_cuda_includes(cuda_home):
    """The pip CUDA headers (site-packages/nvidia/cu*/include) when the toolkit lacks some torch includes.

    torch's CUDA headers include cusparse.h, which a minimal toolkit does not ship.
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(glob.glob(os.path.join(site_packages, "nvidia", "cu*", "include")))
    return [d for d in dirs if os.path.exists(os.path.join(d, "cusparse.h"))]


def toolkit_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None if it does not say."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_build_plan():
    """(build CUDA kernels?, toolkit root, why not): decided before torch's extension module is imported."""
    if os.environ.get("CHANFLEX_SKIP_CUDA", "0") == "1":
        return False, None, "CHANFLEX_SKIP_CUDA=1"
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        if force:
            raise RuntimeError(f"FORCE_CUDA=1, but torch {torch.__version__} is a CPU-only build")
        return False, None, f"torch {torch.__version__} has no CUDA"
    if cuda_home is None:
        named = [f"{var}={os.environ[var]}" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
        why = (f"{named[0]} is no CUDA toolkit root (bin/nvcc and libcudart)" if named else
               "no CUDA toolkit (bin/nvcc and libcudart) found; set CUDA_HOME")
        if force:
            raise RuntimeError(f"FORCE_CUDA=1, but {why}")
        return False, None, why
    # torch refuses to build against a toolkit of another major version than its own.
    version, torch_major = toolkit_version(cuda_home), int(torch.version.cuda.split(".")[0])
    if version is None or version[0] != torch_major:
        why = (f"the toolkit at {cuda_home} is CUDA {'?' if version is None else '%d.%d' % version}, "
               f"torch was built with CUDA {torch.version.cuda}")
        if force:
            raise RuntimeError(f"FORCE_CUDA=1, but {why}")
        return False, None, why
    return True, cuda_home, ""


BUILD_CUDA, CUDA_HOME, NO_CUDA_REASON = cuda_build_plan()
if BUILD_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # Without a visible GPU torch has no arch to pick (and fails on an empty list).
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def read_version():
    with open(os.path.join(ROOT, "chanflex_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("chanflex_kernels/__init__.py has no __version__")


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    print(f"chanflex_kernels build: DEBUG={int(debug)} MAX_JOBS={os.environ.get('MAX_JOBS', '')} "
          f"FORCE_CUDA={os.environ.get('FORCE_CUDA', '')} CHANFLEX_SKIP_CUDA={os.environ.get('CHANFLEX_SKIP_CUDA', '')} "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}")
    print("chanflex_kernels build: CUDA kernels " +
          (f"on, toolkit {CUDA_HOME}" if BUILD_CUDA else f"off ({NO_CUDA_REASON})"))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cuda/*.cpp"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=fast: fused multiply-adds in the vector loops (ISO mode turns them off).
    cxx_flags += ["-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    if not BUILD_CUDA:
        return CppExtension("chanflex_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["-std=c++17", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "chanflex_kernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=extra_cuda_includes(CUDA_HOME),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    version=read_version(),
    packages=find_packages(include=["chanflex_kernels", "chanflex_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
