"""A short run of tools/fuzz_decoder.py (atheris), where atheris is installed."""
import os
import subprocess
import sys

import pytest

from cluster import REPO

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")


@pytest.mark.timeout(120)
def test_atheris_decoder_short_run(tmp_path):
    seconds = os.environ.get("RDMAKV_ATHERIS_SECONDS", "10")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "fuzz_decoder.py"),
                           f"-max_total_time={seconds}", "-rss_limit_mb=1024", str(tmp_path)],
                          capture_output=True, text=True, timeout=110, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [line for line in done.stderr.splitlines() if "Done" in line]
    print(f"\nFIGURE atheris: {runs[-1] if runs else done.stderr.splitlines()[-1]}")
