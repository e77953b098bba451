"""An OpenSSH server in each host of a tests/netns.py Topology, with a throwaway key:
what rdmakv.launch -H and mpirun need to start processes on "other machines".
Nothing outside the directory given is touched, except /run/sshd, the empty
privilege-separation directory sshd insists on (Debian's package makes it too)."""
import os
import shutil
import subprocess
import time

SSHD = "/usr/sbin/sshd"

SERVER_CONFIG = """\
ListenAddress {address}
Port 22
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PidFile none
"""

CLIENT_CONFIG = """\
Host *
  IdentityFile {dir}/id
  IdentitiesOnly yes
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 10
"""


def probe():
    """None if sshd and ssh can run here, else why not."""
    if shutil.which("ssh") is None or not os.path.exists(SSHD):
        return "OpenSSH is not installed (ci/setup.sh installs openssh-server)"
    return None


class SshHosts:
    """sshd in every host of topology; `ssh` is the client command line that reaches them."""

    def __init__(self, topology, directory):
        self.dir = str(directory)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{self.dir}/host_key"], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{self.dir}/id"], check=True)
        shutil.copy(f"{self.dir}/id.pub", f"{self.dir}/authorized_keys")
        with open(f"{self.dir}/ssh_config", "w") as config:
            config.write(CLIENT_CONFIG.format(dir=self.dir))
        self.ssh = ["ssh", "-F", f"{self.dir}/ssh_config"]
        self.topology = topology
        for name, host in topology.hosts.items():
            path = f"{self.dir}/sshd_{name}"
            with open(path, "w") as config:
                config.write(SERVER_CONFIG.format(address=host.ipv4, dir=self.dir))
            topology.spawn(name, [SSHD, "-D", "-e", "-f", path], env={"PATH": os.environ["PATH"]},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = next(iter(topology.hosts))
        for host in topology.hosts.values():
            self.wait_for(first, host.ipv4)

    def wait_for(self, source, address, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(["ip", "netns", "exec", self.topology.hosts[source].namespace, *self.ssh,
                                   address, "true"], capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd at {address} did not answer: {done.stderr.strip()}")
            time.sleep(0.2)
