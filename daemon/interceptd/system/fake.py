"""In-memory stand-ins for the kernel ports (Kernel, Router), for unit tests of everything above them."""

from __future__ import annotations

import copy
from typing import Any

from interceptd.errors import KernelRefusedError, RoutingError
from interceptd.ruleset.nftjson import Json
from interceptd.system.routes import Entry


class FakeKernel:
    """An in-memory kernel for unit tests: interprets the commands interceptd emits, per table.

    It keeps named counter values across flushes like the kernel does, can be told to refuse the next
    transactions, and lets a test inject drift by editing `tables` directly.
    """

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.refuse: int = 0  # refuse this many next apply() calls
        self.fail_next: Exception | None = None  # raised by the next apply() or list_table() (any failure kind)
        self.applies = 0

    def _fail(self) -> None:
        error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error

    def apply(self, document: Json) -> None:
        self._fail()
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
            elif verb == "flush":  # like the kernel: rules go, set elements and counter values stay
                tables[key]["rules"] = []
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
            if verb == "add":  # `add set` with elements adds them to the set, new or existing
                nset = t["sets"].setdefault(name, {**copy.deepcopy({k: v for k, v in obj.items() if k != "elem"}),
                                                   "elem": []})
                nset["elem"] += copy.deepcopy(obj.get("elem", []))
            elif verb == "flush":
                t["sets"][name]["elem"] = []
            else:
                del t["sets"][name]
        elif kind == "counter":
            if verb == "add":
                t["counters"].setdefault(name, {**copy.deepcopy(obj), "packets": 0, "bytes": 0})
            else:
                del t["counters"][name]

    def own(self, table: str, family: str = "inet") -> tuple[str, ...]:
        self.tables.setdefault((family, table), {"chains": {}, "sets": {}, "counters": {}, "rules": []})
        return ("owner",)

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        self._fail()
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


class FakeRouter:
    """In-memory routing state for unit tests (pairs with kernel.FakeKernel)."""

    def __init__(self) -> None:
        self.entries: set[Entry] = set()
        self.calls: list[tuple[str, Entry]] = []
        self.refuse = 0  # refuse this many next add() or delete() calls, as a netlink error would

    def _refused(self, verb: str, entry: Entry) -> None:
        if self.refuse:
            self.refuse -= 1
            raise RoutingError(f"cannot {verb} `{entry}`: Operation not permitted (fake)")

    def owned(self) -> set[Entry]:
        return set(self.entries)

    def add(self, entry: Entry) -> None:
        self._refused("add", entry)
        self.calls.append(("add", entry))
        self.entries.add(entry)

    def delete(self, entry: Entry) -> None:
        self._refused("delete", entry)
        self.calls.append(("delete", entry))
        self.entries.discard(entry)
