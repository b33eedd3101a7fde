"""Build chanflex_kernels and its compiled extension chanflex_kernels._C.

The extension holds the op schemas (csrc/*.cpp) and the CPU kernels
(csrc/cpu/*.cpp). Environment variables, printed when the build starts:

    DEBUG=1           compile with -O0 -g
    MAX_JOBS=N        parallel compile jobs (torch's ninja builder)
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "chanflex_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("chanflex_kernels/__init__.py has no __version__")


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    print(f"chanflex_kernels build: DEBUG={int(debug)} MAX_JOBS={os.environ.get('MAX_JOBS', '')}")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=fast: fused multiply-adds in the vector loops (ISO mode turns them off).
    cxx_flags += ["-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    return CppExtension(
        "chanflex_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    version=read_version(),
    packages=find_packages(include=["chanflex_kernels", "chanflex_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
