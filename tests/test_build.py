"""The extension builds without the CUDA toolkit too (host backend only), and says so."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_host_only_build_reports_no_cuda(tmp_path):
    pybind11 = pytest.importorskip("pybind11", reason="the test extra installs pybind11")
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build hift_rt._C (the test extra installs it)"
    configure = [cmake, str(ROOT), "-G", "Ninja", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path}",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 "-DCMAKE_BUILD_TYPE=Release", "-DHIFT_RT_WITH_CUDA=OFF"]
    build = tmp_path / "build"
    build.mkdir()
    out = subprocess.run(configure, cwd=build, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CUDA backend OFF" in out.stdout
    out = subprocess.run([cmake, "--build", ".", "--parallel"], cwd=build, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (so,) = tmp_path.glob("_C*.so")
    # A fresh interpreter: pybind11 refuses to register the Engine type twice in one process.
    probe = ("import importlib.util, json, sys\n"
             "spec = importlib.util.spec_from_file_location('host_only._C', sys.argv[1])\n"
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
             "e = m.Engine('auto')\n"
             "print(json.dumps({'build': m.build_info(), 'probe': m.probe(), 'backend': e.backend}))\n"
             "e.close()\n")
    out = subprocess.run([sys.executable, "-c", probe, str(so)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["build"]["cuda_compiled"] is False
    assert report["probe"]["reason"] == "built without CUDA (toolkit not found at build time)"
    assert report["backend"] == "host"
