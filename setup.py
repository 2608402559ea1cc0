"""Build and install fastdd.

`kernels/` installs as `fastdd.kernels` (a top-level `kernels` package would clash
with another PyPI project). torch is imported here only when prebuilding the CUDA
extension (FASTDD_BUILD_CUDA=1, install with --no-build-isolation); otherwise the
extension is JIT-built from `csrc/` on first use on a GPU machine.
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTDD_BUILD_CUDA") == "1":
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
    package_data={"fastdd.csrc": ["*.cu", "*.cpp", "*.h"]},
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
