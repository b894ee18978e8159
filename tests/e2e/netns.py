"""Several machines on one Linux host: network namespaces on a bridge, for tests that cut one machine's link.

Each "host" is a network namespace with one veth into a bridge in the root namespace; the root namespace
(the test, Label Studio, the image server) has the bridge's address. Everything lives in one private
/24 under 10.213.0.0/16 and only in this sandbox: no forwarding, no route out. `cut(host)` sets the
bridge side of the host's veth down: the host keeps its address and routes but its packets are lost, as
when a switch port fails (open connections hang; they do not fail at once).

Needs root (CAP_NET_ADMIN) and iproute2's `ip`; `namespaces_problem()` says why they cannot be made.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import Proc

SUPERNET = "10.213"
IP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 20.0


class NetnsError(RuntimeError):
    """An `ip` command failed; the message has its command line and stderr."""


def ip(*args: str) -> str:
    """Run `ip args...`; its stdout, or NetnsError with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def namespaces_problem() -> str | None:
    """Why network namespaces cannot be made here (a skip reason), or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN); running as uid {os.geteuid()}"
    probe = f"gsprobe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    with suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: `address` on its veth `inner` (inside), whose peer `port` is on the bridge (root side)."""

    role: str
    netns: str
    address: str
    port: str

    def exec_prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Network:
    """A bridge in the root namespace (address `gateway`) and the hosts plugged into it."""

    tag: str
    prefix: str  # "10.213.N"
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)
    _made: list[tuple[str, str]] = field(default_factory=list, repr=False)  # ("netns"|"link", name) made, in order

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (the test, Label Studio's relay, the image server)."""
        return f"{self.prefix}.1"

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.0/24"

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, role: str) -> Host:
        """A new namespace plugged into the bridge, with the next free address."""
        index = len(self.hosts) + 2
        host = Host(role, f"gsam-{self.tag}-{role}", f"{self.prefix}.{index}", f"gs{self.tag}{index}")
        ip("netns", "add", host.netns)
        self._made.append(("netns", host.netns))
        ip("link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        self._made.append(("link", host.port))
        ip("link", "set", host.port, "master", self.bridge)
        ip("link", "set", host.port, "up")
        inside = ("netns", "exec", host.netns, "ip")
        ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")
        self.hosts[role] = host
        return host

    def cut(self, role: str) -> None:
        """Unplug the host: from now on its frames are lost. Its own link only loses carrier: open connections
        hang, new ones fail once ARP gives up (EHOSTUNREACH after a few seconds), as with a dead switch port."""
        ip("link", "set", self.hosts[role].port, "down")

    def restore(self, role: str) -> None:
        ip("link", "set", self.hosts[role].port, "up")

    def destroy(self) -> list[str]:
        """Kill what still runs in the namespaces (only this test's processes run there), delete them and the
        links; returns what could not be undone."""
        problems = []
        for netns in (name for kind, name in self._made if kind == "netns"):
            with suppress(NetnsError):
                for pid in ip("netns", "pids", netns).split():
                    with suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for kind, name in reversed(self._made):
            try:
                if kind == "netns":
                    ip("netns", "del", name)  # its veth end goes with it, and so does the peer
                elif Path("/sys/class/net", name).exists():
                    ip("link", "del", name)
            except (NetnsError, subprocess.TimeoutExpired) as exc:
                problems.append(str(exc))
        return problems


def _free_prefix() -> str:
    """A 10.213.N prefix no interface of this machine uses (another run of the test may hold one)."""
    used = ip("-4", "-o", "addr", "show")
    for _ in range(50):
        prefix = f"{SUPERNET}.{int.from_bytes(os.urandom(1), 'big') % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    raise NetnsError(f"no free /24 in {SUPERNET}.0.0/16")


@contextmanager
def sandbox_network(roles: tuple[str, ...]) -> Iterator[Network]:
    """A bridge and one namespace per role, removed when the block exits (however it exits)."""
    tag = uuid.uuid4().hex[:5]
    network = Network(tag, _free_prefix(), f"gs{tag}br")
    try:
        network.create()
        for role in roles:
            network.add_host(role)
        yield network
    finally:
        problems = network.destroy()
        assert not problems, f"could not remove the test network {network.tag}: {problems}"


class NamespacedProcesses:
    """Processes started inside hosts of a Network, each logging to a file; all stopped by `stop_all`."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._started: list[Proc] = []

    def start(self, host: Host, command: list[str], env: dict[str, str], name: str) -> Proc:
        log_path = self._logs / f"{host.role}-{name}-{len(self._started)}.log"
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [*host.exec_prefix(), *command], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        proc = Proc(popen, log_path, env=env)
        self._started.append(proc)
        return proc

    def backend(self, host: Host, args: list[str], env: dict[str, str]) -> Proc:
        """A `grounded-sam` command (serve, worker) inside `host`."""
        return self.start(host, [sys.executable, "-m", "backend.commands", *args], env, args[0])

    def stop_all(self) -> None:
        for proc in reversed(self._started):
            proc.stop(timeout=STOP_TIMEOUT_S)


@contextmanager
def tcp_relay(listen_host: str, target: tuple[str, int]) -> Iterator[int]:
    """Relay TCP connections from `listen_host`:<free port> to `target` (e.g. a server bound to loopback that
    the namespaces cannot reach); yields the port. Connections end when either side closes or the block exits."""
    server = socket.create_server((listen_host, 0))
    stopping = threading.Event()
    sockets: list[socket.socket] = []

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while not stopping.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            sockets.extend((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    threading.Thread(target=accept, daemon=True, name="tcp-relay").start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stopping.set()
        server.close()
        for sock in sockets:
            with suppress(OSError):
                sock.close()


def wait_listening(address: tuple[str, int], proc: Proc, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on `address`, or fail with `proc`'s log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"process exited with {proc.popen.returncode}:\n{proc.log()}")
        with suppress(OSError), socket.create_connection(address, timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {address} within {timeout:.0f} s:\n{proc.log()}")
