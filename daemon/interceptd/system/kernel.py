"""The only caller of libnftables: apply one document, list interceptd's table (the fake is in system.fake).

Nothing here ever lists the whole ruleset: a newer nft elsewhere can make an older one crash on objects it
does not know. Other tables are not ours: only `doctor` reads them (system.inspect), each in a forked child.
"""

from __future__ import annotations

import _thread
import functools
import json
import re

from interceptd.errors import BindingMissingError, KernelRefusedError, PermissionDeniedError
from interceptd.ruleset.nftjson import Json
from interceptd.system.fds import low_descriptor_free

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    import signal as _signal  # typeshed describes the C module through signal
    from typing import Any, Protocol
else:
    import _signal  # the C module under signal, whose enums a one-shot apply need not import

    Protocol = object  # Kernel is a plain class at run time, a protocol for mypy

BINDING_HINT = ("the libnftables Python binding is missing: install Debian's python3-nftables "
                "(apt-get install python3-nftables) and use a Python that sees it (a venv with "
                "--system-site-packages on /usr/bin/python3)")


PERMISSION_HINT = "needs root or CAP_NET_ADMIN in the target network namespace"
CAP_NET_ADMIN = 12


def has_net_admin(status: str = "/proc/self/status") -> bool:
    """Whether this process holds CAP_NET_ADMIN (effective). Asked before libnftables is: without it,
    libnftables prints "Operation not permitted (you must be root)" and "cache initialization failed" to
    stderr itself, and the command's own error would be a third, less clear line."""
    try:
        # Bytes: the ascii codec would be one more import, and the Name line may hold any byte.
        with open(status, "rb") as fh:
            caps = next(line.split()[1] for line in fh if line.startswith(b"CapEff:"))
    except (OSError, StopIteration, IndexError):
        return True  # no /proc to ask: let libnftables answer
    return bool(int(caps, 16) >> CAP_NET_ADMIN & 1)


class Kernel(Protocol):
    def apply(self, document: Json) -> None:
        """Run the document as one transaction, or raise KernelRefusedError having changed nothing."""

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        """The table's JSON listing (objects, with counter values), or None when it does not exist."""

    def own(self, table: str, family: str = "inet") -> tuple[str, ...]:
        """Make the table owned by this kernel context (created if missing); returns the flags read back."""

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        """Only the table's named counters (a scrape: its size does not grow with the sets), or None."""

    def check(self, document: Json) -> None:
        """Validate the document as apply would, committing nothing; raise KernelRefusedError if refused."""

    def table_flags(self, table: str, family: str = "inet") -> tuple[str, ...]:
        """The table's flags (owner, persist); () when it has none or does not exist."""

    def version(self) -> str:
        """libnftables' version, for preflight's minimum and for reports."""


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
    """libnftables through Debian's python3-nftables, in the caller's network namespace or in `netns`.

    A libnftables context binds to the namespace its thread is in when it is created, so one made inside
    `netns` (a namespace file) keeps working there from any thread. With `keep_context=False` each call
    makes a fresh context: a context keeps its last cache, about 0.5 MB once it has seen interceptd's table,
    too much to hold for each of hundreds of pods (the node agent); creating one costs about 0.4 ms.
    """

    def __init__(self, netns: str = "", keep_context: bool = True) -> None:
        try:
            import nftables
        except ImportError:
            raise BindingMissingError(BINDING_HINT) from None
        if not has_net_admin():
            raise PermissionDeniedError(PERMISSION_HINT)
        self._module = nftables
        self.netns = netns  # routes.router_for puts the TPROXY routes in the same namespace
        self._kept = self._new() if keep_context else None
        # One libnftables context is not safe for concurrent use. threading.Lock is this very lock; importing
        # threading for it would cost a one-shot `apply` 0.6 ms.
        self._lock = _thread.allocate_lock()
        self._owned: set[tuple[str, str]] = set()  # tables this context created with the owner flag

    def _new(self) -> Any:
        if self.netns:
            from interceptd.system.netns import entered

            with entered(self.netns):
                nft = self._module.Nftables()
        else:
            nft = self._module.Nftables()
        nft.set_json_output(True)
        nft.set_handle_output(True)  # an incremental update replaces rules by handle (normalise drops them)
        return nft

    def _context(self) -> _Call:
        """`with self._context() as nft`: the context for one call, used under the lock (a fresh one is freed
        when dropped)."""
        return _Call(self)

    def _run(self, document: Json, dry_run: bool = False) -> tuple[int, str]:
        document = self._for_owned(document)
        with self._context() as nft:
            nft.set_dry_run(dry_run)
            try:
                # The document is built from the rule model, so it holds no cycle: without the check (a dict
                # entry per list and object) 10,000 set elements encode in three quarters of the time.
                rc, _out, err = nft.cmd(json.dumps(document, check_circular=False))
            finally:
                nft.set_dry_run(False)
        return rc, str(err).strip()

    def _text(self, command: str, dry_run: bool = False) -> tuple[int, str, str]:
        """A command in nft's text syntax, with text output: the only way to set and read table flags. Without
        handles: the text listing is parsed by line and replayed as a script (`own`)."""
        with self._context() as nft:
            nft.set_json_output(False)
            nft.set_handle_output(False)
            nft.set_dry_run(dry_run)
            try:
                rc, out, err = nft.cmd(command)
            finally:
                nft.set_json_output(True)
                nft.set_handle_output(True)
                nft.set_dry_run(False)
        return rc, str(out), str(err).strip()

    def _for_owned(self, document: Json) -> Json:
        """Drop `add table` for tables we own: it would ask to clear the owner flag, which the kernel refuses."""
        if not self._owned:
            return document
        return {"nftables": [cmd for cmd in document["nftables"] if not (
            "add" in cmd and "table" in cmd["add"] and _ref(cmd["add"]["table"]) in self._owned)]}

    def apply(self, document: Json) -> None:
        rc, err = self._run(document)
        if rc != 0:
            hint = ""
            if "Operation not permitted" in err and any("owner" in self.table_flags(name, fam)
                                                        for fam, name in _tables(document)):
                hint = " (the table is owned by another process: an agent running with --own-table; stop it first)"
            raise KernelRefusedError(f"libnftables refused the transaction, nothing was changed: "
                                     f"{self._culprit(document)}: {_one_line(err)}{hint}")
        for cmd in document["nftables"]:
            if "delete" in cmd and "table" in cmd["delete"]:
                self._owned.discard(_ref(cmd["delete"]["table"]))

    def persist_supported(self) -> bool:
        """Can this libnftables and kernel keep an owned table after its owner exits (flag `persist`)?"""
        rc, _out, _err = self._text("add table inet interceptd-probe { flags owner, persist; }", dry_run=True)
        return rc == 0

    def own(self, table: str, family: str = "inet") -> tuple[str, ...]:
        """Make the table owned by this context: no other process can then flush, edit or delete it.

        A missing table is created with the flag. An existing one cannot gain it, so it is replaced in one
        text transaction by a copy of itself (its own listing, counters as listed) that carries the flag,
        with a bridge copy capturing meanwhile. The flags are read back: some versions ignore what they lack.
        """
        if (family, table) in self._owned:
            return self.table_flags(table, family)
        flags = "owner, persist" if self.persist_supported() else "owner"
        rc, listing, err = self._text(f"list table {family} {table}")
        if rc != 0 and "No such file or directory" not in err:
            raise KernelRefusedError(f"cannot list table {family} {table}: {_one_line(err)}")
        if rc != 0:
            rc, _out, err = self._text(f"add table {family} {table} {{ flags {flags}; }}")
        elif "owner" in _flags_of(listing):
            raise KernelRefusedError(f"table {family} {table} is already owned by another process")
        else:
            head, _, body = listing.partition("\n")
            rc, err = self._replace_bridged(family, table, body,
                                            f"delete table {family} {table}\n{head}\n\tflags {flags}\n{body}")
        if rc != 0:
            raise KernelRefusedError(f"cannot make table {family} {table} owned (flags {flags}): {_one_line(err)}")
        self._owned.add((family, table))
        got = self.table_flags(table, family)
        if "owner" not in got:
            self._owned.discard((family, table))
            raise KernelRefusedError(f"table {family} {table}: the kernel did not keep the owner flag")
        return got

    def _replace_bridged(self, family: str, table: str, body: str, script: str) -> tuple[int, str]:
        """Run `script` (delete the table, add its owned copy) while a second copy under another name
        captures: the kernel's delete-and-add of a nat table, though one transaction, let new connections
        pass uncaptured (27 of 57,000 probes over 150 swaps; none with the bridge). A connection either
        table redirects is redirected once; the bridge goes again right after."""
        bridge = f"{table}-takeover"
        rc, _out, err = self._text(f"table {family} {bridge} {{\n{body}")
        if rc != 0:
            return rc, err
        try:
            rc, _out, err = self._text(script)
        finally:
            self._text(f"delete table {family} {bridge}")
        return rc, err

    def table_flags(self, table: str, family: str = "inet") -> tuple[str, ...]:
        """The table's flags from the text listing (libnftables 1.0.6 prints garbage for them in JSON)."""
        rc, listing, _err = self._text(f"list table {family} {table}")
        return _flags_of(listing) if rc == 0 else ()

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
        with self._context() as nft:
            rc, out, err = nft.cmd("list tables inet")
        if rc != 0:
            raise KernelRefusedError(f"cannot list tables: {_one_line(str(err))}")
        # Not json.loads: an owned table's flags make libnftables 1.0.6 print garbage further on.
        match = re.search(r'"metainfo": \{"version": "([^"]+)"', str(out))
        return match.group(1) if match else "unknown"

    def list_tables_text(self) -> str:
        """`list tables` as text (one `table FAMILY NAME` line each): names only, no object of theirs is parsed,
        and no JSON, which libnftables 1.0.6 garbles after an owned table's flags. For `doctor`'s reading."""
        rc, out, err = self._text("list tables")
        if rc != 0:
            raise KernelRefusedError(f"cannot list tables: {_one_line(err)}")
        return out

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        """A table with flags is listed piece by piece: libnftables 1.0.6 prints a table's flags in JSON from
        freed memory (garbage, invalid JSON or no output at all), and only the table object carries them."""
        if (family, table) not in self._owned:
            try:
                items = self._list(f"list table {family} {table}")
                if items is None or (items and "flags" not in items[0].get("table", {"flags": None})):
                    return items
            except ValueError:
                pass
        rc, listing, err = self._text(f"list table {family} {table}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise KernelRefusedError(f"cannot list table {family} {table}: {_one_line(err)}")
        # One command each: in one buffer, libnftables 1.0.6 filters its cache for the first `list chain` only.
        # One set at a time: its `list sets table` lists the sets of every table of the family.
        _flags, chains, sets = _listing_lines()
        commands = [f"list counters table {family} {table}",
                    *(f"list set {family} {table} {name}" for name in sets.findall(listing)),
                    *(f"list chain {family} {table} {name}" for name in chains.findall(listing))]
        return [{"table": {"family": family, "name": table}}, *(i for c in commands for i in self._list(c) or [])]

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        return self._list(f"list counters table {family} {table}")

    def _list(self, command: str) -> list[Json] | None:
        with self._context() as nft:
            rc, out, err = nft.cmd(command)
        if rc != 0:
            if "No such file or directory" in str(err):
                return None
            raise KernelRefusedError(f"cannot {command}: {_one_line(str(err))}")
        items: list[Json] = json.loads(out)["nftables"] if out else []
        return [item for item in items if "metainfo" not in item]


_AGENT_SIGNALS = {_signal.SIGHUP, _signal.SIGTERM, _signal.SIGINT}


class _Call:
    """One libnftables call: the kernel's lock held, the agent's signals blocked, the context handed out.

    A SIGHUP landing in libnftables' netlink exchange made it fail with "Interrupted system call" (a refused
    reload); blocked, signals wait for the call to end. A class, not contextlib.contextmanager: neither
    contextlib nor signal (_signal is the C module under it) is imported by a one-shot apply.
    """

    def __init__(self, kernel: NftKernel) -> None:
        self._kernel = kernel

    def __enter__(self) -> Any:
        kernel = self._kernel
        kernel._lock.acquire()
        self._mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _AGENT_SIGNALS)
        try:
            if kernel._kept is not None:
                return kernel._kept
            low_descriptor_free("libnftables")  # a fresh context's socket must get a descriptor below 1024
            return kernel._new()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, self._mask)
        finally:
            self._kernel._lock.release()


@functools.cache
def _listing_lines() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """The table's flags, chain and set lines of a text listing: for owned tables (an agent's `--own-table`)
    and `doctor`, compiled at their first use, not by every apply."""
    return (re.compile(r"^\tflags (.+)$", re.M), re.compile(r"^\tchain (\S+) \{$", re.M),
            re.compile(r"^\tset (\S+) \{$", re.M))


def _flags_of(listing: str) -> tuple[str, ...]:
    flags, _chains, _sets = _listing_lines()
    match = flags.search(listing.partition("\n\n")[0])  # the table's own lines, before its first object
    return tuple(f.strip() for f in match.group(1).split(",")) if match else ()


def _ref(obj: Json) -> tuple[str, str]:
    return str(obj.get("family", "")), str(obj.get("name", ""))


def _tables(document: Json) -> set[tuple[str, str]]:
    out = set()
    for cmd in document["nftables"]:
        ((_verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        out.add(_ref(obj) if kind == "table" else (str(obj.get("family", "")), str(obj.get("table", ""))))
    return out


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip() and set(line.strip()) != {"^"})
