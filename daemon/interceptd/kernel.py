"""The only caller of libnftables: apply one document, list interceptd's table. Plus an in-memory fake.

Nothing here ever lists the whole ruleset or names another table: a newer nft elsewhere can make an older
one crash on objects it does not know, and other tables are not ours.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any, Protocol

from .errors import BindingMissingError, KernelRefusedError

Json = dict[str, Any]

BINDING_HINT = ("the libnftables Python binding is missing: install Debian's python3-nftables "
                "(apt-get install python3-nftables) and use a Python that sees it (a venv with "
                "--system-site-packages on /usr/bin/python3)")


class Kernel(Protocol):
    def apply(self, document: Json) -> None:
        """Run the document as one transaction, or raise KernelRefusedError having changed nothing."""

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        """The table's JSON listing (objects, with counter values), or None when it does not exist."""

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        """Only the table's named counters (a scrape: its size does not grow with the sets), or None."""


def describe_command(cmd: Json) -> str:
    """`add rule inet interceptd istio-output "proxy-uid-return"`: how an error names a failing command."""
    ((verb, body),) = cmd.items()
    ((kind, obj),) = body.items()
    where = [obj.get("family", ""), obj.get("table", obj.get("name", ""))]
    if kind == "rule":
        where += [obj.get("chain", ""), json.dumps(obj.get("comment", ""))]
    elif kind != "table":
        where.append(obj.get("name", ""))
    return " ".join([verb, kind, *[w for w in where if w]])


class NftKernel:
    """libnftables through Debian's python3-nftables, in the network namespace the process is in."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError:
            raise BindingMissingError(BINDING_HINT) from None
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()  # one libnftables context is not safe for concurrent use

    def _run(self, document: Json, dry_run: bool = False) -> tuple[int, str]:
        with self._lock:
            self._nft.set_dry_run(dry_run)
            try:
                rc, _out, err = self._nft.cmd(json.dumps(document))
            finally:
                self._nft.set_dry_run(False)
        return rc, str(err).strip()

    def apply(self, document: Json) -> None:
        rc, err = self._run(document)
        if rc != 0:
            raise KernelRefusedError(f"libnftables refused the transaction, nothing was changed: "
                                     f"{self._culprit(document)}: {_one_line(err)}")

    def check(self, document: Json) -> None:
        """libnftables' check mode: the kernel validates the whole transaction and commits nothing."""
        rc, err = self._run(document, dry_run=True)
        if rc != 0:
            raise KernelRefusedError(f"libnftables refused the transaction: {self._culprit(document)}: "
                                     f"{_one_line(err)}")

    def _culprit(self, document: Json) -> str:
        """libnftables' JSON errors do not say which command failed: bisect in check mode to find it."""
        cmds = document["nftables"]
        lo, hi = 1, len(cmds)  # the shortest failing prefix has length in [lo, hi]
        if self._run({"nftables": cmds}, dry_run=True)[0] == 0:
            return "the transaction failed only when committed"
        while lo < hi:
            mid = (lo + hi) // 2
            if self._run({"nftables": cmds[:mid]}, dry_run=True)[0] != 0:
                hi = mid
            else:
                lo = mid + 1
        return f"command {lo} of {len(cmds)} ({describe_command(cmds[lo - 1])})"

    def version(self) -> str:
        """libnftables' version, from the metainfo of a listing of table names only (never their rules)."""
        with self._lock:
            rc, out, err = self._nft.cmd("list tables inet")
        if rc != 0:
            raise KernelRefusedError(f"cannot list tables: {_one_line(str(err))}")
        for item in json.loads(out)["nftables"]:
            if "metainfo" in item:
                return str(item["metainfo"]["version"])
        return "unknown"

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        return self._list(f"list table {family} {table}")

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        return self._list(f"list counters table {family} {table}")

    def _list(self, command: str) -> list[Json] | None:
        with self._lock:
            rc, out, err = self._nft.cmd(command)
        if rc != 0:
            if "No such file or directory" in str(err):
                return None
            raise KernelRefusedError(f"cannot {command}: {_one_line(str(err))}")
        items: list[Json] = json.loads(out)["nftables"]
        return [item for item in items if "metainfo" not in item]


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip() and set(line.strip()) != {"^"})


class FakeKernel:
    """An in-memory kernel for unit tests: interprets the commands interceptd emits, per table.

    It keeps named counter values across flushes like the kernel does, can be told to refuse the next
    transactions, and lets a test inject drift by editing `tables` directly.
    """

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.refuse: int = 0  # refuse this many next apply() calls
        self.applies = 0

    def apply(self, document: Json) -> None:
        if self.refuse:
            self.refuse -= 1
            raise KernelRefusedError("libnftables refused the transaction (fake)")
        tables = copy.deepcopy(self.tables)
        for cmd in document["nftables"]:
            ((verb, body),) = cmd.items()
            ((kind, obj),) = body.items()
            self._do(tables, verb, kind, obj)
        self.tables = tables
        self.applies += 1

    @staticmethod
    def _do(tables: dict[tuple[str, str], dict[str, Any]], verb: str, kind: str, obj: Json) -> None:
        key = (obj["family"], obj["table"] if kind != "table" else obj["name"])
        if kind == "table":
            if verb == "add":
                tables.setdefault(key, {"chains": {}, "sets": {}, "counters": {}, "rules": []})
            elif verb == "flush":
                tables[key]["rules"] = []
                for s in tables[key]["sets"].values():
                    s["elem"] = []
            elif verb == "delete":
                del tables[key]
            return
        t = tables[key]
        name = obj.get("name")
        if kind == "rule":
            t["rules"].append(copy.deepcopy(obj))
        elif kind == "chain":
            if verb == "add":
                t["chains"].setdefault(name, copy.deepcopy(obj))
            else:
                if any(r["chain"] == name for r in t["rules"]):
                    raise KernelRefusedError(f"chain {name} is not empty (fake)")
                del t["chains"][name]
        elif kind == "set":
            if verb == "add":
                t["sets"].setdefault(name, {**copy.deepcopy(obj), "elem": []})
            elif verb == "flush":
                t["sets"][name]["elem"] = []
            else:
                del t["sets"][name]
        elif kind == "element":
            t["sets"][name]["elem"] += copy.deepcopy(obj["elem"])
        elif kind == "counter":
            if verb == "add":
                t["counters"].setdefault(name, {**copy.deepcopy(obj), "packets": 0, "bytes": 0})
            else:
                del t["counters"][name]

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        t = self.tables.get((family, table))
        if t is None:
            return None
        items: list[Json] = [{"table": {"family": family, "name": table}}]
        items += [{"counter": copy.deepcopy(c)} for c in t["counters"].values()]
        for s in t["sets"].values():
            body = copy.deepcopy(s)
            if not body["elem"]:
                del body["elem"]
            items.append({"set": body})
        items += [{"chain": copy.deepcopy(c)} for c in t["chains"].values()]
        items += [{"rule": copy.deepcopy(r)} for r in t["rules"]]
        return items

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        t = self.tables.get((family, table))
        return None if t is None else [{"counter": copy.deepcopy(c)} for c in t["counters"].values()]

    def count(self, table: str, counter: str, packets: int, nbytes: int) -> None:
        """Simulate traffic hitting a rule."""
        c = self.tables[("inet", table)]["counters"][counter]
        c["packets"] += packets
        c["bytes"] += nbytes
