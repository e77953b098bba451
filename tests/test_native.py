"""The compiled core imports without libibverbs, and `python -m rdmakv.info` reports."""
import os
import shutil
import subprocess
import sys

import pytest

from cluster import REPO

ENV = dict(os.environ, PYTHONPATH=REPO)


def libibverbs_path():
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "libibverbs.so.1 " in line and "=>" in line:
            return line.split("=>")[1].strip()
    return None


def test_extension_does_not_link_libibverbs():
    from rdmakv.native import transport
    needed = subprocess.run(["readelf", "-d", transport.__file__], capture_output=True, text=True).stdout
    assert "libibverbs" not in needed


def test_tcp_works_where_libibverbs_is_absent():
    library = libibverbs_path()
    if library is None:
        code = "import rdmakv; from rdmakv import native; assert native.libibverbs_error; print('tcp ok')"
        done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "tcp ok" in done.stdout, done.stderr
        return
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to hide libibverbs in a private mount namespace")
    # Hide the real library from this one process tree by mounting /dev/null over it.
    code = ("import numpy as np, rdmakv; from rdmakv import native; "
            "assert native.libibverbs_error, 'libibverbs still loaded'; "
            "from rdmakv.native import transport as t; a = np.ones(4, np.float32); "
            "t.add_into(a, a, 2); assert (a == 2).all(); print('tcp ok:', native.libibverbs_error)")
    script = f"mount --bind /dev/null {library} && exec {sys.executable} -c \"{code}\""
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=ENV, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0 and "mount" in done.stderr and "permission" in done.stderr.lower():
        pytest.skip(f"cannot create a private mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "tcp ok" in done.stdout


def test_info_reports_transports_and_configuration():
    done = subprocess.run([sys.executable, "-m", "rdmakv.info"], env=dict(ENV, DMLC_NUM_WORKER="3"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tcp    available" in done.stdout
    assert "num_workers        3" in done.stdout and "DMLC_NUM_WORKER" in done.stdout


@pytest.mark.parametrize("json_output", [False, True])
def test_info_fails_on_a_bad_configuration(json_output):
    # A launcher script can check the environment with it before starting anything.
    done = subprocess.run([sys.executable, "-m", "rdmakv.info", *(["--json"] if json_output else [])],
                          env=dict(ENV, DMLC_ENABLE_RDMA="yes"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "DMLC_ENABLE_RDMA='yes'" in done.stdout, (done.stdout, done.stderr)
