"""Build and install fastdd.

`kernels/` installs as `fastdd.kernels` (a top-level `kernels` package would clash
with another PyPI project). The CUDA extension is prebuilt into the wheel as
`fastdd._C` when the build environment can: torch importable with CUDA, and nvcc. pip
builds in an isolated environment without torch, so that means installing with
`--no-build-isolation` into an environment with a CUDA torch, e.g.
`pip install --no-build-isolation ".[cuda]"` (the extra brings ninja, a parallel build).
FASTDD_BUILD_CUDA=1 insists (an error if it cannot), FASTDD_BUILD_CUDA=0 never builds.
Otherwise the extension is JIT-built from `csrc/` on first use on a GPU machine.
torch is imported here only for that check, never required.
"""
import os
import re
import subprocess

from setuptools import find_packages, setup


def _prebuild_cuda() -> bool:
    """Whether to build the CUDA extension now (see the module docstring)."""
    wanted = os.environ.get("FASTDD_BUILD_CUDA", "").strip()
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"FASTDD_BUILD_CUDA must be 0 or 1, got {wanted!r}")
    if wanted == "1":
        return True
    if wanted == "0":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:  # the usual isolated build: no torch, JIT build on first use
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    try:  # torch refuses to build with an nvcc of another major version: leave it to the JIT
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
        nvcc_major = re.search(r"release (\d+)", out).group(1)
    except (OSError, AttributeError):
        return False
    if nvcc_major != torch.version.cuda.split(".")[0]:
        print(f"fastdd: not prebuilding the CUDA extension: nvcc is CUDA {nvcc_major}, torch {torch.version.cuda}",
              flush=True)
        return False
    print(f"fastdd: prebuilding the CUDA extension (torch {torch.__version__}, CUDA at {CUDA_HOME}); "
          "FASTDD_BUILD_CUDA=0 skips it", flush=True)
    return True


ext_modules, cmdclass = [], {}
if _prebuild_cuda():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))
    )
    ext_modules.append(
        CUDAExtension(
            "fastdd._C",
            sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    name="fastdd",
    version="0.1.0",
    description="Data valuation, pruning and dataset distillation over fast per-sample gradients",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdd", "fastdd.*"]) + ["fastdd.kernels", "fastdd.csrc"],
    # kernels/ and csrc/ sit at the top of the repo but install inside fastdd;
    # csrc/ ships its sources so the extension can be JIT-built after `pip install .`.
    package_dir={"fastdd.kernels": "kernels", "fastdd.csrc": "csrc"},
    package_data={"fastdd.csrc": ["*.cu", "*.cpp", "*.h", "*.c"]},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "triton>=3.0", "ninja"],
        "demo": ["scikit-learn", "matplotlib"],
        "cuda": ["ninja"],
    },
    ext_modules=ext_modules,
    entry_points={"console_scripts": ["fastdd = fastdd.cli:main"]},
    cmdclass=cmdclass,
)
