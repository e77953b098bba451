"""`python -m rdmakv.info`: versions, transports, RDMA devices (or why there
are none) and the effective configuration."""
import argparse
import json
import platform
import sys

import numpy

import rdmakv
from rdmakv import _native
from rdmakv.config import SETTINGS, Config
from rdmakv.errors import ConfigError


def _shm_state():
    from rdmakv.transport import shm
    missing = shm.unavailable()
    return (f"unavailable: {missing}" if missing
            else "available: auto uses it between co-located workers and servers (RDMAKV_SHM=0 forbids)")


def gather(environ=None):
    try:
        config = Config.load(environ)
        settings = [{"setting": n, "value": v, "from": s} for n, v, s in config.describe()]
        config_error = None
    except ConfigError as exc:
        settings, config_error = [], str(exc)
    return {
        "rdmakv": rdmakv.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "transports": {
            "tcp": "available",
            "shm": _shm_state(),
            "verbs": ("libibverbs loaded; no verbs transport in this build"
                      if _native.libibverbs_error is None else f"unavailable: {_native.libibverbs_error}"),
        },
        "mxnet": rdmakv.has("mxnet"),
        "settings": settings,
        "config_error": config_error,
        "variables": {name: list(spec[0]) for name, spec in SETTINGS.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rdmakv.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = gather()
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"rdmakv {info['rdmakv']}  (python {info['python']}, numpy {info['numpy']}, "
          f"mxnet {'yes' if info['mxnet'] else 'not installed'})")
    print("transports:")
    for name, state in info["transports"].items():
        print(f"  {name:6} {state}")
    if info["config_error"]:
        print(f"configuration error: {info['config_error']}")
    else:
        print("configuration:")
        for row in info["settings"]:
            print(f"  {row['setting']:18} {row['value']!s:24} ({row['from']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
