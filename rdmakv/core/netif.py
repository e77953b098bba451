"""Which address a node advertises and listens on.  Fails fast, naming the
choices, instead of hanging on a wrong interface (a classic ps-lite pitfall)."""
import fcntl
import ipaddress
import os
import socket
import struct

from rdmakv.core.errors import ConfigError

SIOCGIFADDR = 0x8915


def resolve(host, port=0):
    """(family, sockaddr) for host, which may be an IPv4/IPv6 literal (brackets allowed) or a name."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def interface_address(name):
    """The interface's IPv4 address, else its global (then link-local) IPv6 address."""
    known = [n for _, n in socket.if_nameindex()]
    if name not in known:
        raise ConfigError(f"network interface {name!r} does not exist; this host has: {', '.join(known)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            return socket.inet_ntoa(packed[20:24])
        except OSError:
            pass
    candidates = []
    with open("/proc/net/if_inet6") as table:
        for line in table:
            hexaddr, _, _, scope, _, ifname = line.split()
            if ifname == name:
                address = ipaddress.IPv6Address(bytes.fromhex(hexaddr))
                candidates.append((int(scope, 16) != 0, str(address) + ("" if int(scope, 16) == 0 else f"%{name}")))
    if not candidates:
        raise ConfigError(f"network interface {name!r} has no IPv4 or IPv6 address")
    return sorted(candidates)[0][1]


def advertised_host(config):
    """The address peers should use to reach this node."""
    if config.node_host:
        return config.node_host
    if config.interface:
        return interface_address(config.interface)
    family, sockaddr = resolve(config.scheduler_host, config.scheduler_port)
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)   # UDP connect sends nothing; it only picks the route
        return probe.getsockname()[0]


def host_identity():
    """What names this host for sharing memory: the kernel (its boot id) and the
    network namespace, as for the shared-memory transport's abstract sockets."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        namespace = 0
    return f"{boot}/{namespace}"


def free_port(host="127.0.0.1"):
    """A TCP port free on host now (the kernel's pick), for a listener started soon after."""
    family, sockaddr = resolve(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(sockaddr)
        return probe.getsockname()[1]


def format_address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
