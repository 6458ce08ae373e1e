"""Build: the Python package plus the C++ transfer engine `hift_rt._C`, built by CMake + Ninja.

The CUDA backend is compiled in when CMake finds the CUDA toolkit (headers and cudart; nvcc is
not needed). Set HIFT_RT_CUDA=0 to build the host backend only.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        with_cuda = os.environ.get("HIFT_RT_CUDA", "1") not in ("0", "OFF", "off", "false")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DHIFT_RT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


setup(
    packages=["hift_rt", "hift_rt.kernels", "hift_rt.job", "hift_rt.bench", "hift_rt.integrations"],
    ext_modules=[CMakeExtension("hift_rt._C")],
    cmdclass={"build_ext": CMakeBuild},
)
