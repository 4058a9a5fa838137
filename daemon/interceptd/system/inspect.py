"""Read-only looks at the namespace for `doctor`: other tables, iptables, listeners, interfaces.

Other tables are read in a forked child, one table per child: libnftables can crash on objects a newer nft
put there (which is why system.kernel never lists the whole ruleset), and a crash must cost one finding
("could not be read"), not the process. Nothing here changes the kernel: listings, `*-save` dumps and /proc.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from typing import Any

from interceptd.ruleset.nftjson import Json

CHILD_TIMEOUT_S = 10.0
SAVE_TIMEOUT_S = 10.0
IPTABLES_SAVES = ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save")
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_TABLE_LINE = re.compile(r"^table (\S+) (\S+)", re.M)


def _in_child(fn: Callable[[], Any], timeout: float = CHILD_TIMEOUT_S) -> Any:
    """fn() in a forked child; its JSON result, or RuntimeError naming why there is none (a crash, a hang)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            payload = json.dumps(["ok", fn()])
        except BaseException as exc:  # everything goes back to the parent as a reason
            payload = json.dumps(["err", str(exc) or type(exc).__name__])
        with os.fdopen(wfd, "w") as out:
            out.write(payload)
        os._exit(0)
    os.close(wfd)
    chunks = []
    try:
        with os.fdopen(rfd, "rb") as inp:
            while select.select([inp], [], [], timeout)[0]:
                chunk = inp.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            else:
                os.kill(pid, 9)
                raise RuntimeError(f"no answer within {timeout:g} s")
    finally:
        _pid, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise RuntimeError(f"libnftables crashed (signal {os.WTERMSIG(status)}) listing it")
    kind, value = json.loads(b"".join(chunks) or b'["err", "no output"]')
    if kind != "ok":
        raise RuntimeError(value)
    return value


def _table_names() -> list[list[str]]:
    from interceptd.system.kernel import NftKernel

    return [list(pair) for pair in _TABLE_LINE.findall(NftKernel(keep_context=False).list_tables_text())]


def other_tables(ours: tuple[str, str]) -> dict[tuple[str, str], list[Json] | str]:
    """Every other table's listing, or why it could not be read."""
    from interceptd.system.kernel import NftKernel

    out: dict[tuple[str, str], list[Json] | str] = {}
    for family, name in _in_child(_table_names):
        if (family, name) == ours or name.startswith("interceptd-"):
            continue
        def listed(f: str = family, n: str = name) -> list[Json] | None:
            return NftKernel(keep_context=False).list_table(n, f)

        try:
            listing = _in_child(listed)
            out[(family, name)] = listing if listing is not None else []
        except RuntimeError as exc:
            out[(family, name)] = str(exc)
    return out


def iptables_rules() -> dict[str, list[str]]:
    """Per iptables flavour present on this host, the `-A` lines of its save output in this namespace."""
    out: dict[str, list[str]] = {}
    for tool in IPTABLES_SAVES:
        path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}")
                                           if os.access(p, os.X_OK)), None)
        if path is None:
            continue
        try:
            done = subprocess.run([path], capture_output=True, text=True, timeout=SAVE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        out[tool.removesuffix("-save")] = [line for line in done.stdout.splitlines() if line.startswith("-A ")]
    return out


def listening_tcp() -> dict[int, set[int]]:
    """Port -> uids of the TCP sockets listening on it in this namespace (/proc/net is per namespace)."""
    out: dict[int, set[int]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if len(words) > 7 and words[3] == "0A":  # TCP_LISTEN
                out.setdefault(int(words[1].rpartition(":")[2], 16), set()).add(int(words[7]))
    return out


def interfaces() -> frozenset[str]:
    return frozenset(name for _index, name in socket.if_nameindex())


def is_up(name: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack("16sH", name.encode(), 0))
        except OSError:
            return False
    return bool(struct.unpack_from("16sH", raw)[1] & _IFF_UP)
