"""A home network behind NAT, made of Linux network namespaces, for tests and benchmarks (needs root and `ip`).

    home 10.77.1.2 --veth-- router 10.77.1.1 | 10.77.2.1 --veth-- outside 10.77.2.2
                            iptables: MASQUERADE out, forward back only what belongs to a connection made from home

The outside namespace holds the bootstrap node, public peers and the client; the home namespace holds the peer
behind NAT. Nothing outside can open a connection to home (there is no route, and the router forwards nothing
new inbound), while home can connect out. Namespaces have their own addresses, so the private addresses above
never meet the machine's own; names are unique per lab, and `close()` (also on `with` exit) kills every process
left in them and deletes them.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import shutil
import signal
import subprocess
import threading
from typing import Callable, Sequence, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
HOME_IP, ROUTER_HOME_IP, ROUTER_OUTSIDE_IP, OUTSIDE_IP = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
_counter = itertools.count()


def unavailable() -> str | None:
    """Why this machine cannot build a lab (one line), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing"
    probe = f"efprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NatLab:
    """`with NatLab() as lab:` builds home / router / outside; `lab.command(lab.home, argv)` runs inside one."""

    def __init__(self) -> None:
        tag = f"ef{os.getpid() % 100000}{next(_counter)}"  # interface names have at most 15 characters
        self.tag = tag
        self.home, self.router, self.outside = f"{tag}-home", f"{tag}-rtr", f"{tag}-out"
        self._made: list[str] = []

    def __enter__(self) -> "NatLab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ip(self, *args: str, namespace: str | None = None) -> None:
        argv = ["ip", *(["-n", namespace] if namespace else []), *args]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")

    def _in(self, namespace: str, *argv: str) -> None:
        done = subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` in {namespace} failed: {done.stderr.strip()}")

    def _build(self) -> None:
        for namespace in (self.home, self.router, self.outside):
            self._ip("netns", "add", namespace)
            self._made.append(namespace)
            self._ip("link", "set", "lo", "up", namespace=namespace)
        home_if, router_home_if = f"{self.tag}h0", f"{self.tag}h1"
        router_out_if, outside_if = f"{self.tag}o0", f"{self.tag}o1"
        self._ip("link", "add", home_if, "netns", self.home, "type", "veth", "peer", "name", router_home_if, "netns", self.router)
        self._ip("link", "add", router_out_if, "netns", self.router, "type", "veth", "peer", "name", outside_if, "netns", self.outside)
        for namespace, interface, address in ((self.home, home_if, HOME_IP), (self.router, router_home_if, ROUTER_HOME_IP),
                                              (self.router, router_out_if, ROUTER_OUTSIDE_IP), (self.outside, outside_if, OUTSIDE_IP)):
            self._ip("addr", "add", f"{address}/24", "dev", interface, namespace=namespace)
            self._ip("link", "set", interface, "up", namespace=namespace)
        self._ip("route", "add", "default", "via", ROUTER_HOME_IP, namespace=self.home)  # outside has no route home
        self._in(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._in(self.router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", router_out_if, "-j", "MASQUERADE")
        self._in(self.router, "iptables", "-P", "FORWARD", "DROP")
        self._in(self.router, "iptables", "-A", "FORWARD", "-i", router_home_if, "-o", router_out_if, "-j", "ACCEPT")
        self._in(self.router, "iptables", "-A", "FORWARD", "-i", router_out_if, "-o", router_home_if,
                 "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        logger.info(f"NAT lab {self.tag}: home {HOME_IP} behind router {ROUTER_OUTSIDE_IP}, outside {OUTSIDE_IP}")

    @staticmethod
    def command(namespace: str, argv: Sequence[str] = ()) -> list[str]:
        """`argv` run inside `namespace` (as a prefix when `argv` is empty)."""
        return ["ip", "netns", "exec", namespace, *argv]

    def close(self) -> None:
        """Kill whatever still runs in the lab's namespaces, then delete them."""
        for namespace in reversed(self._made):
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._made.clear()


def call_in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """`function()` on a new thread that has joined `namespace`'s network; processes it starts stay in there.

    A network namespace belongs to a thread, so the caller's own thread is untouched. A client built this way
    (its DHT process and p2p daemon are forked from that thread) talks to the swarm from inside the namespace,
    and can be used from any thread afterwards: the process reaches its daemon through a Unix socket.
    """
    result: list = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
            finally:
                os.close(fd)
            result.append((True, function()))
        except BaseException as e:  # handed to the caller's thread
            result.append((False, e))

    thread = threading.Thread(target=run, name=f"in {namespace}")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
