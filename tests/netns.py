"""Several "hosts" on one machine: network namespaces, each joined to a router
namespace by a veth pair, with its own IPv4 (198.18.0.0/15, the benchmark
range) and IPv6 (fd00::/8, unique local) addresses.  Everything is created
here with `ip` and torn down by close(); nothing touches the host's own
interfaces.

Faults go on a host's link in the router: `tc netem` where the kernel has it,
else tests/impair.py, a userspace netem the router's policy rules steer that
host's packets through (the same delay, loss, duplication and reordering
model, applied to the same real packets)."""
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "rdkvt"
IMPAIR_TABLE = 100


_LISTEN = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
listener = socket.socket(family)
listener.bind((sys.argv[1], 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
listener.settimeout(float(sys.argv[2]))
listener.accept()[0].sendall(b"ok")
"""
_CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as conn:
    assert conn.recv(2) == b"ok"
"""


def ip(*args, check=True):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def run_in(namespace, *argv, check=True):
    result = subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True,
                            timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"{namespace}: {' '.join(argv)}: {result.stderr.strip()}")
    return result


def sysctl(namespace, name, value):
    run_in(namespace, "sysctl", "-qw", f"{name}={value}")


def ours():
    """Namespaces this test suite created (possibly by a crashed earlier run)."""
    listing = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(PREFIX)]


def remove_stale():
    """Delete namespaces left by runs whose process is gone (names carry the creator's pid)."""
    for name in ours():
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            ip("netns", "del", name, check=False)


def probe():
    """None if namespaces and veth pairs can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"the kernel refuses network namespaces: {made.stderr.strip()}"
        pair = ip("-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1", check=False)
        if pair.returncode != 0:
            return f"the kernel refuses veth pairs: {pair.stderr.strip()}"
        return None
    except FileNotFoundError:
        return "the ip command (iproute2) is missing"
    finally:
        ip("netns", "del", name, check=False)


class Host:
    def __init__(self, name, namespace, index):
        self.name = name
        self.namespace = namespace
        self.index = index
        self.ipv4 = f"198.18.{index}.2"
        self.ipv6 = f"fd00:0:0:{index:x}::2"
        self.router_link = f"vh{index}"      # the router's end of this host's veth pair
        self.link = "eth0"                   # the host's end

    def address(self, family):
        return self.ipv4 if family == 4 else self.ipv6


class Topology:
    """Hosts around one router.  close() removes every namespace and process it made."""

    def __init__(self, names):
        self.tag = f"{PREFIX}{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.router = f"{self.tag}-rtr"
        self.hosts = {}
        self.namespaces = []
        self.procs = []
        self._impairer = None
        self._impaired = []
        self.netem = None             # True/False once impair() has tried tc netem
        try:
            self._build(names)
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name):
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        sysctl(name, "net.ipv6.conf.all.keep_addr_on_down", 1)
        sysctl(name, "net.ipv6.conf.default.accept_dad", 0)
        sysctl(name, "net.ipv6.conf.all.accept_dad", 0)

    def _build(self, names):
        self._add_namespace(self.router)
        sysctl(self.router, "net.ipv4.ip_forward", 1)
        sysctl(self.router, "net.ipv6.conf.all.forwarding", 1)
        sysctl(self.router, "net.ipv4.conf.all.rp_filter", 0)
        sysctl(self.router, "net.ipv4.conf.default.rp_filter", 0)
        for index, name in enumerate(names, start=1):
            host = Host(name, f"{self.tag}-{name}", index)
            self._add_namespace(host.namespace)
            ip("-n", self.router, "link", "add", host.router_link, "type", "veth",
               "peer", "name", host.link, "netns", host.namespace)
            ip("-n", self.router, "addr", "add", f"198.18.{index}.1/24", "dev", host.router_link)
            ip("-n", self.router, "addr", "add", f"fd00:0:0:{index:x}::1/64", "dev", host.router_link, "nodad")
            ip("-n", self.router, "link", "set", host.router_link, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.ipv4}/24", "dev", host.link)
            ip("-n", host.namespace, "addr", "add", f"{host.ipv6}/64", "dev", host.link, "nodad")
            ip("-n", host.namespace, "link", "set", host.link, "up")
            ip("-n", host.namespace, "route", "add", "default", "via", f"198.18.{index}.1")
            ip("-n", host.namespace, "-6", "route", "add", "default", "via", f"fd00:0:0:{index:x}::1")
            self.hosts[name] = host

    # ---- processes -------------------------------------------------------
    def spawn(self, host, argv, env, **popen):
        """Start argv inside host's namespace (ip netns exec execs it: the pid is the program's)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].namespace, *argv], env=env,
                                start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def reachable(self, source, target, family, timeout=5.0):
        """Whether a TCP connection from source to target's address of this family succeeds
        (there is no ping on the CI image; this is the same check, at the layer we use)."""
        listener = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[target].namespace, sys.executable, "-c", _LISTEN,
             self.hosts[target].address(family), str(timeout)],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            port = listener.stdout.readline().strip()
            if not port:
                return False
            result = run_in(self.hosts[source].namespace, sys.executable, "-c", _CONNECT,
                            self.hosts[target].address(family), port, str(timeout), check=False)
            return result.returncode == 0
        finally:
            listener.kill()
            listener.wait()
            listener.stdout.close()

    # ---- faults ----------------------------------------------------------
    def impair(self, hosts, delay_ms=20, jitter_ms=5, loss=1.0, duplicate=1.0, reorder=5.0, seed=1):
        """Delay, lose, duplicate and reorder every packet sent to or from these hosts."""
        netem = ["delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss}%",
                 "duplicate", f"{duplicate}%", "reorder", f"{reorder}%"]
        for name in hosts:
            host = self.hosts[name]
            tried = run_in(self.router, "tc", "qdisc", "add", "dev", host.router_link, "root", "netem", *netem,
                           check=False)
            if tried.returncode == 0:
                # netem on the router's end shapes traffic to the host; on the host's end, traffic from it.
                run_in(host.namespace, "tc", "qdisc", "add", "dev", host.link, "root", "netem", *netem)
                self.netem = True
                self._impaired.append(name)
                continue
            if "unknown" not in tried.stderr.lower() and "not found" not in tried.stderr.lower():
                raise RuntimeError(f"tc netem: {tried.stderr.strip()}")
            self.netem = False
            self._steer_through_impairer(host, delay_ms, jitter_ms, loss, duplicate, reorder, seed)
            self._impaired.append(name)

    def _steer_through_impairer(self, host, delay_ms, jitter_ms, loss, duplicate, reorder, seed):
        if self._impairer is None:
            ready = f"/tmp/{self.tag}-impair.ready"
            self._stats = f"/tmp/{self.tag}-impair.json"
            for path in (ready, self._stats):
                if os.path.exists(path):
                    os.unlink(path)
            self._impairer = subprocess.Popen(
                ["ip", "netns", "exec", self.router, sys.executable, os.path.join(HERE, "impair.py"), "imp0",
                 "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--loss", str(loss),
                 "--duplicate", str(duplicate), "--reorder", str(reorder), "--seed", str(seed),
                 "--stats", self._stats, "--ready", ready], start_new_session=True)
            deadline = time.monotonic() + 10
            while not os.path.exists(ready):
                if self._impairer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("tests/impair.py did not start")
                time.sleep(0.05)
            ip("-n", self.router, "link", "set", "imp0", "up")
            sysctl(self.router, "net.ipv4.conf.imp0.rp_filter", 0)
            ip("-n", self.router, "route", "add", "default", "dev", "imp0", "table", str(IMPAIR_TABLE))
            ip("-n", self.router, "-6", "route", "add", "default", "dev", "imp0", "table", str(IMPAIR_TABLE))
            for family in ("-4", "-6"):
                ip("-n", self.router, family, "rule", "add", "iif", "imp0", "lookup", "main", "priority", "99")
        # Packets arriving from the host, and packets routed towards it, take one detour through
        # imp0; what the impairer writes back (iif imp0) is routed normally.
        for family in ("-4", "-6"):
            destination = f"198.18.{host.index}.0/24" if family == "-4" else f"fd00:0:0:{host.index:x}::/64"
            ip("-n", self.router, family, "rule", "add", "iif", host.router_link, "lookup", str(IMPAIR_TABLE),
               "priority", "100")
            ip("-n", self.router, family, "rule", "add", "to", destination, "lookup", str(IMPAIR_TABLE),
               "priority", "101")

    def heal(self):
        """Remove every impairment; return the impairer's counters (or None with netem)."""
        for name in self._impaired:
            host = self.hosts[name]
            if self.netem:
                run_in(self.router, "tc", "qdisc", "del", "dev", host.router_link, "root", check=False)
                run_in(host.namespace, "tc", "qdisc", "del", "dev", host.link, "root", check=False)
        self._impaired = []
        if self._impairer is None:
            return None
        for family in ("-4", "-6"):
            while ip("-n", self.router, family, "rule", "del", "lookup", str(IMPAIR_TABLE),
                     check=False).returncode == 0:
                pass
        self._impairer.send_signal(signal.SIGTERM)
        self._impairer.wait(10)
        self._impairer = None
        with open(self._stats) as stats:
            counts = json.load(stats)
        os.unlink(self._stats)
        return counts

    def link_down(self, host, seconds):
        """Take the host's link down in the router for `seconds`, then bring it back."""
        link = self.hosts[host].router_link
        ip("-n", self.router, "link", "set", link, "down")
        time.sleep(seconds)
        ip("-n", self.router, "link", "set", link, "up")

    def set_link(self, host, up):
        ip("-n", self.router, "link", "set", self.hosts[host].router_link, "up" if up else "down")

    # ---- teardown --------------------------------------------------------
    def close(self):
        for proc in self.procs + ([self._impairer] if self._impairer else []):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        self._impairer = None
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)
        self.namespaces = []
