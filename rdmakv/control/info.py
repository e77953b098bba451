"""`python -m rdmakv.info`: versions, transports, RDMA devices (or why there
are none) and the effective configuration."""
import argparse
import importlib.util
import json
import platform
import sys

import numpy

import rdmakv
from rdmakv.core.config import SETTINGS, Config
from rdmakv.core.errors import ConfigError


def _shm_state():
    from rdmakv.transport import shm
    missing = shm.unavailable()
    return (f"unavailable: {missing}" if missing
            else "available: auto uses it between co-located workers and servers (RDMAKV_SHM=0 forbids)")


def _devices():
    """(describe_devices() list, None) or ([], the reason there are none)."""
    from rdmakv.core.errors import TransportError
    from rdmakv.transport.verbs import devices as verbs_devices
    import errno
    try:
        return verbs_devices.describe_devices(), None
    except TransportError as exc:
        if getattr(exc, "errno", None) == errno.ENOSYS:
            return [], "this kernel has no RDMA support (ibv_get_device_list: ENOSYS)"
        return [], str(exc)


def gather(environ=None):
    from rdmakv.transport.verbs import devices as verbs_devices
    usable, reason = verbs_devices.probe()
    devices, devices_error = _devices()
    if not devices and devices_error is None:
        devices_error = "no RDMA devices"
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
            "verbs": (f"available: {reason}" if usable else f"unavailable: {reason}"),
        },
        "devices": devices,
        "devices_error": devices_error,
        # Installed, not imported: importing MXNet takes seconds (minutes under emulation).
        "mxnet": importlib.util.find_spec("mxnet") is not None,
        "settings": settings,
        "config_error": config_error,
        "variables": {name: list(spec[0]) for name, spec in SETTINGS.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rdmakv.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        info = gather()
    except ImportError as exc:
        if exc.name != "rdmakv.native._transport":
            raise
        print(f"rdmakv: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
        return 1 if info["config_error"] else 0
    print(f"rdmakv {info['rdmakv']}  (python {info['python']}, numpy {info['numpy']}, "
          f"mxnet {'yes' if info['mxnet'] else 'not installed'})")
    print("transports:")
    for name, state in info["transports"].items():
        print(f"  {name:6} {state}")
    print("RDMA devices:")
    if info["devices_error"]:
        print(f"  none: {info['devices_error']}")
    for dev in info["devices"]:
        print(f"  hca_id: {dev['device']}")
        for field in ("fw_ver", "node_guid", "sys_image_guid", "vendor_id", "vendor_part_id", "hw_ver",
                      "phys_port_cnt", "max_qp", "max_cqe", "max_mr_size", "max_sge"):
            print(f"    {field + ':':16} {dev[field]}")
        for port in dev["ports"]:
            print(f"    port: {port['port']}")
            print(f"      {'state:':14} {port['state']}")
            print(f"      {'max_mtu:':14} {port['max_mtu']}")
            print(f"      {'active_mtu:':14} {port['active_mtu']}")
            print(f"      {'link_layer:':14} {port['link_layer']}")
            print(f"      {'port_lid:':14} {port['lid']}")
            print(f"      {'sm_lid:':14} {port['sm_lid']}")
            print(f"      {'gid_tbl_len:':14} {port['gid_tbl_len']}")
            print(f"      {'max_msg_sz:':14} {port['max_msg_sz']:#x}")
            for gid in port["gids"]:
                print(f"      GID[{gid['index']:3}]:      {gid['gid']}, {gid['type']}")
    if info["config_error"]:
        print(f"configuration error: {info['config_error']}")
    else:
        print("configuration:")
        for row in info["settings"]:
            print(f"  {row['setting']:18} {row['value']!s:24} ({row['from']})")
    return 1 if info["config_error"] else 0     # a launcher script can check the environment with it


if __name__ == "__main__":
    raise SystemExit(main())
