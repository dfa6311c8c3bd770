"""A network namespace standing in for another host, joined to this one by a veth pair.

    with Namespace() as ns:                # as root; ns.outside and ns.inside are its addresses
        subprocess.Popen(ns.command(["python3", ...]))   # runs on "the other host"
        ns.cut()                            # the link goes down: packets vanish, no RST, no FIN
        ns.restore()

Both addresses are in 10.213.0.0/16, made here on the pair this test created, and the
namespace reaches nothing else: only the test's own addresses carry traffic. `cut()` takes the
outer end down, so the inner end loses its carrier: what a pulled cable or a dead switch does,
not a refused connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess

NETWORK = "10.213.0.0/16"


def why_not() -> str | None:
    """Why namespaces cannot be made here; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (`apt-get install iproute2`)"
    probe = Namespace()
    try:
        probe.create()
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` refused here ({exc.stderr.strip() or exc.returncode})"
    finally:
        probe.destroy()
    return None


class Namespace:
    """One namespace and its veth pair; a /30 of 10.213.0.0/16 picked at random."""

    def __init__(self) -> None:
        tag = os.urandom(3).hex()
        self.name = f"kb-{tag}"
        self.outer, self.inner = f"kbo{tag}", f"kbi{tag}"  # at most 15 characters
        block = int(tag, 16) % (1 << 14) * 4  # a /30 within the /16
        self.outside = f"10.213.{block >> 8}.{(block & 0xFF) + 1}"
        self.inside = f"10.213.{block >> 8}.{(block & 0xFF) + 2}"

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> Namespace:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", self.name)
        _ip("addr", "add", f"{self.outside}/30", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        self.inside_ip("addr", "add", f"{self.inside}/30", "dev", self.inner)
        self.inside_ip("link", "set", self.inner, "up")
        self.inside_ip("link", "set", "lo", "up")
        return self

    def destroy(self) -> None:
        """Remove the pair and the namespace (the processes in it are the caller's to end)."""
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def inside_ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.outer, "down")

    def restore(self) -> None:
        _ip("link", "set", self.outer, "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
