"""pip first: what the wheel and sdist carry, and the installed commands."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

import rdmakv
from cluster import REPO

TOOLS = os.path.join(REPO, "tools")


def _tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode:
        pytest.skip("not a git checkout (an unpacked sdist): nothing to build a clean copy from")
    return [name for name in listed.stdout.decode().split("\0") if name and os.path.exists(os.path.join(REPO, name))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheel and an sdist built from a clean copy of the tracked files, with
    setuptools' own PEP 517 hooks (what pip and `python -m build` call)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in _tracked_files():
        os.makedirs(os.path.dirname(source / name), exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), source / name)
    hooks = ("from setuptools import build_meta as hooks; import sys; out = sys.argv[1]; "
             "hooks.build_sdist(out); hooks.build_wheel(out)")      # a build rewrites sys.argv
    proc = subprocess.run([sys.executable, "-c", hooks, str(out)], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


def test_the_wheel_has_the_module_without_its_c_file_or_debug_info_and_the_license(built, tmp_path):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("rdmakv-0.1.0.dist-info/METADATA").decode()
        module = next(n for n in names if n.startswith("rdmakv/native/_transport.") and n.endswith(".so"))
        archive.extract(module, tmp_path)
    assert not [n for n in names if n.endswith(".c")]
    assert "rdmakv/py.typed" in names and "rdmakv-0.1.0.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "Provides-Extra: bench" in metadata and "Requires-Dist: matplotlib; extra == \"bench\"" in metadata
    sections = subprocess.run(["readelf", "-S", "--wide", str(tmp_path / module)], capture_output=True,
                              text=True, check=True).stdout
    assert ".text" in sections and ".debug_info" not in sections


def test_the_sdist_has_what_its_tests_need_and_no_generated_c(built):
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "MANIFEST.in", "setup.py", "pyproject.toml", "rdmakv/native/_transport.pyx", "rdmakv/native/_shm.h",
            "tests/conftest.py", "tests/cluster.py", "tests/kvstore_helpers.py", "tests/rdma/conftest.py",
            "tools/bench_kvstore.py", "examples/pushpull_demo.py", "ci/setup.sh"} <= names
    assert "rdmakv/native/_transport.c" not in names


def test_every_installed_tool_has_a_python_shebang():
    # pip rewrites a `#!...python` line to the venv's interpreter; without one the
    # command runs under /bin/sh.
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["tool"]["setuptools"]["script-files"]
    for script in scripts:
        with open(os.path.join(REPO, script)) as f:
            assert f.readline().startswith("#!/usr/bin/env python3"), script


def _source_tree_without_extension(tmp_path):
    """A copy of the package sources, never built, as a fresh checkout is, and
    a Python that has this one's packages but no rdmakv installed."""
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(REPO, "rdmakv"), tree / "rdmakv",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    os.makedirs(tree / "tools")
    shutil.copy2(os.path.join(TOOLS, "bench_kvstore.py"), tree / "tools")
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # A plain path line: numpy and the rest, without the .pth that makes rdmakv importable here.
    (site_packages,) = (venv / "lib").glob("python3.*/site-packages")
    numpy_home = os.path.dirname(os.path.dirname(np.__file__))
    (site_packages / "this-venv.pth").write_text(numpy_home + "\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return tree, str(venv / "bin" / "python"), env


def test_an_unbuilt_source_tree_says_so_in_one_line(tmp_path):
    tree, python, env = _source_tree_without_extension(tmp_path)
    proc = subprocess.run([python, "-m", "rdmakv.info"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tree} is a source tree without its built extension" in proc.stderr
    assert "`pip install -e .` builds it in place, or run from another directory" in proc.stderr


def test_a_benchmark_whose_system_under_test_cannot_start_fails(tmp_path):
    tree, python, env = _source_tree_without_extension(tmp_path)
    proc = subprocess.run([python, str(tree / "tools" / "bench_kvstore.py"), "--quick", "--systems",
                           "rdmakv", "--workloads", "4KiB", "--iperf-seconds", "1"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rdmakv could not start" in proc.stderr and "source tree without its built extension" in proc.stderr


@pytest.mark.skipif(rdmakv.has("verbs"), reason="this host can use verbs")
@pytest.mark.parametrize("argv", [["bench_transport.py", "--transport", "verbs", "--quick"],
                                  ["verbs_pingpong.py"]])
def test_verbs_tools_without_a_device_say_why_in_one_line(argv):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, argv[0]), *argv[1:]], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    from rdmakv.transport.verbs import devices as verbs_devices
    assert proc.stderr.strip().endswith(f"cannot use verbs: {verbs_devices.probe()[1]}")


@pytest.mark.parametrize("tool", ["bench_kvstore.py", "bench_transport.py"])
def test_plot_without_matplotlib_names_the_extra(tool, tmp_path):
    # None in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    run = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", run, os.path.join(TOOLS, tool), "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2
    assert "--plot needs matplotlib: pip install 'rdmakv[bench]'" in proc.stderr
