"""Builds rocketrec's fused serving operator (deploy/cpp/rocketrec_ops.cpp) into
rocketrec/_rocketrec_ops.so with torch's C++ extension tools; everything else is in
pyproject.toml. The same source is built by CMake for C++ servers (deploy/cpp)."""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "rocketrec._rocketrec_ops",
            ["deploy/cpp/rocketrec_ops.cpp"],
            extra_compile_args=["-O3", "-Wall", "-Wextra"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
)
