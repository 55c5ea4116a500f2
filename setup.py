"""Builds the C++ core `switchcit._C` and maps the top-level `kernels/` folder to `switchcit.kernels`.

`kernels/` is installed as a subpackage on purpose: a top-level `kernels` package would clash with
Hugging Face's `kernels` distribution.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

core = Pybind11Extension(
    "switchcit._C",
    sorted(glob("csrc/*.cpp")),
    cxx_std=17,
    # OpenMP parallelises the CPU LoRA kernels; no -march=native: the kernels dispatch on the CPU
    # at run time (target_clones), so the build runs on any x86-64 machine.
    extra_compile_args=["-O3", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(
    packages=find_packages(include=["switchcit", "switchcit.*"]) + ["switchcit.kernels"],
    package_dir={"switchcit.kernels": "kernels"},
    ext_modules=[core],
    cmdclass={"build_ext": build_ext},
)
