"""Configuration: defaults < TOML file < environment (istio-iptables names) < command-line flags.

One table (OPTIONS) describes every setting once: its TOML key, istio-iptables long and short flag,
environment variables and parser. The CLI, the TOML loader, the README's reference and the tests all read
it, so a setting cannot exist in one place and be missing in another.
"""

from __future__ import annotations

import functools
import os
import pwd
import re

from interceptd.config import values as v
from interceptd.errors import ConfigError
from interceptd.records import record

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any, Literal

    Kind = Literal["bool", "int", "list", "str", "float"]


@record
class Option:
    key: str  # TOML key and Config attribute
    long: str  # long flag without the leading dashes
    short: str | None
    envs: tuple[str, ...]  # later beats earlier; argv beats all
    parse: Callable[[str], Any]
    default: str
    kind: Kind  # what TOML types are accepted
    help: str
    scope: Literal["capture", "compat", "agent"] = "capture"

    @property
    def flag(self) -> str:
        return f"--{self.long}"


def _opt(key: str, long: str, short: str | None, envs: tuple[str, ...], parse: Callable[[str], Any],
         default: str, kind: Kind, help: str, scope: Literal["capture", "compat", "agent"] = "capture",
         ) -> Option:
    return Option(key, long, short, envs, parse, default, kind, help, scope)


OPTIONS: tuple[Option, ...] = (
    _opt("envoy_port", "envoy-port", "p", (), v.parse_port, "15001", "int",
         "Port the proxy listens on for captured outbound TCP (ENVOY_PORT is only echoed by Istio, not read)."),
    _opt("inbound_capture_port", "inbound-capture-port", "z", ("INBOUND_CAPTURE_PORT",), v.parse_port,
         "15006", "int", "Port captured inbound TCP is sent to (REDIRECT target, TPROXY on-port)."),
    _opt("inbound_tunnel_port", "inbound-tunnel-port", "e", ("INBOUND_TUNNEL_PORT",), v.parse_port, "15008",
         "int", "HBONE tunnel port, never captured inbound (exempt in TPROXY mode too, unlike Istio)."),
    _opt("proxy_uid", "proxy-uid", "u", ("PROXY_UID",), v.parse_id_names, "", "list",
         "User IDs or names of the proxy, whose traffic is never captured. Default: the uid of ENVOY_USER "
         "(istio-proxy), else 1337. Several uids each behave as a single one (Istio lets the first shadow the "
         "others)."),
    _opt("proxy_gid", "proxy-gid", "g", ("PROXY_GID",), v.parse_id_names, "", "list",
         "Group IDs or names of the proxy. Default: the same list as --proxy-uid."),
    _opt("inbound_interception_mode", "istio-inbound-interception-mode", "m",
         ("ISTIO_INBOUND_INTERCEPTION_MODE",), v.parse_mode, "REDIRECT", "str",
         "REDIRECT or TPROXY. Istio silently treats any other value as REDIRECT; interceptd refuses it."),
    _opt("inbound_tproxy_mark", "istio-inbound-tproxy-mark", "t", ("ISTIO_INBOUND_TPROXY_MARK",),
         v.parse_u32, "1337", "int", "Packet mark for TPROXY mode (ignored in REDIRECT mode)."),
    _opt("inbound_tproxy_route_table", "istio-inbound-tproxy-route-table", "r",
         ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",), v.parse_route_table, "133", "int",
         "Policy routing table for TPROXY mode (ignored in REDIRECT mode)."),
    _opt("inbound_ports", "istio-inbound-ports", "b", ("ISTIO_INBOUND_PORTS",), v.parse_inbound_ports, "",
         "list", "Inbound TCP ports to capture: '*' = all but --istio-local-exclude-ports and the tunnel port; "
         "'' = no inbound capture."),
    _opt("local_exclude_ports", "istio-local-exclude-ports", "d", ("ISTIO_LOCAL_EXCLUDE_PORTS",),
         v.parse_ports, "", "list", "Inbound TCP ports never captured (only used with --istio-inbound-ports '*')."),
    _opt("exclude_interfaces", "istio-exclude-interfaces", "c", ("ISTIO_EXCLUDE_INTERFACES",),
         v.parse_ifnames, "", "list", "Interfaces whose traffic is never captured, in or out."),
    _opt("service_cidr", "istio-service-cidr", "i", ("ISTIO_SERVICE_CIDR",), v.parse_include_cidrs, "",
         "list", "Outbound destinations to capture: '*' = all, '' = none, or a CIDR list."),
    _opt("service_exclude_cidr", "istio-service-exclude-cidr", "x", ("ISTIO_SERVICE_EXCLUDE_CIDR",),
         v.parse_cidrs, "", "list", "Outbound destinations never captured (wins over -i and -q)."),
    _opt("outbound_ports", "istio-outbound-ports", "q", ("ISTIO_OUTBOUND_PORTS",), v.parse_ports, "", "list",
         "Outbound TCP ports always captured, whatever -i says (after -x)."),
    _opt("local_outbound_ports_exclude", "istio-local-outbound-ports-exclude", "o",
         ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",), v.parse_ports, "", "list",
         "Outbound TCP and UDP ports never captured (checked first)."),
    _opt("kube_virt_interfaces", "kube-virt-interfaces", "k", ("KUBE_VIRT_INTERFACES",), v.parse_ifnames, "",
         "list", "Interfaces whose arriving traffic is treated as outbound (KubeVirt VMs)."),
    _opt("dry_run", "dry-run", "n", ("DRY_RUN",), v.parse_bool, "false", "bool",
         "Print the ruleset instead of installing it; never touches the kernel (Istio's nft backend does). "
         "interceptd-cni prints it on stderr and applies nothing."),
    _opt("iptables_probe_port", "iptables-probe-port", None, ("IPTABLES_PROBE_PORT",), v.parse_uint16,
         "15002", "int", "Destination port of the --run-validation probe."),
    _opt("probe_timeout", "probe-timeout", None, ("PROBE_TIMEOUT",), v.parse_duration, "5s", "str",
         "Deadline of the --run-validation probe (Go duration)."),
    _opt("skip_rule_apply", "skip-rule-apply", None, ("SKIP_RULE_APPLY",), v.parse_bool, "false", "bool",
         "Program nothing (use with --run-validation)."),
    _opt("run_validation", "run-validation", None, ("RUN_VALIDATION",), v.parse_bool, "false", "bool",
         "After applying, check that the redirect works; exit 126 if not."),
    _opt("redirect_dns", "redirect-dns", None, ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"), v.parse_bool,
         "false", "bool", "Capture DNS (port 53) to the agent's DNS proxy on 15053 (ambient: the node proxy's, "
         "--ambient-dns-port)."),
    _opt("capture_all_dns", "capture-all-dns", None, ("CAPTURE_ALL_DNS",), v.parse_bool, "false", "bool",
         "With --redirect-dns: capture DNS to any server, not only resolv.conf's."),
    _opt("drop_invalid", "drop-invalid", None, ("DROP_INVALID", "INVALID_DROP"), v.parse_bool, "false",
         "bool", "Drop inbound TCP packets conntrack marks invalid."),
    _opt("dual_stack", "dual-stack", None, ("DUAL_STACK", "ISTIO_DUAL_STACK"), v.parse_bool, "false", "bool",
         "Enable IPv6 capture when any global IPv6 address exists (else the first address decides)."),
    _opt("capture_mode", "capture-mode", None, ("INTERCEPTD_CAPTURE_MODE",), v.parse_capture_mode, "sidecar",
         "str", "sidecar (istio-iptables' rules for a pod's own proxy) or ambient (istio-cni's in-pod rules that "
         "send the pod's TCP to a node proxy listening in the pod: -p, -z and -e are its ports; docs/ambient.md)."),
    _opt("ambient_ingress", "ambient-ingress", None, ("INTERCEPTD_AMBIENT_INGRESS",), v.parse_bool, "false",
         "bool", "ambient: no inbound capture and no probe exemption (Istio's ingress mode, "
                 "ambient.istio.io/bypass-inbound-capture)."),
    _opt("ambient_dns_port", "ambient-dns-port", None, ("INTERCEPTD_AMBIENT_DNS_PORT",), v.parse_port, "15053",
         "int", "ambient: port of the node proxy's DNS proxy (with --redirect-dns)."),
    _opt("ambient_mark", "ambient-mark", None, ("INTERCEPTD_AMBIENT_MARK",), v.parse_mark, "0x539", "int",
         "ambient: the mark the node proxy puts on its own sockets (under --ambient-mark-mask); never captured."),
    _opt("ambient_connmark", "ambient-connmark", None, ("INTERCEPTD_AMBIENT_CONNMARK",), v.parse_mark, "0x111",
         "int", "ambient: conntrack mark of the proxy's connections into the pod; their replies are routed back "
                "to the proxy (policy route to --ambient-route-table)."),
    _opt("ambient_mark_mask", "ambient-mark-mask", None, ("INTERCEPTD_AMBIENT_MARK_MASK",), v.parse_mark,
         "0xfff", "int", "ambient: the bits of the packet and conntrack marks interceptd owns."),
    _opt("ambient_route_table", "ambient-route-table", None, ("INTERCEPTD_AMBIENT_ROUTE_TABLE",),
         v.parse_route_table, "100", "int",
         "ambient: policy routing table whose local default route returns replies to the proxy."),
    _opt("ambient_probe_address", "ambient-probe-address", None, ("HOST_PROBE_SNAT_IP",),
         v.parse_ipv4_host, "169.254.7.127", "str",
         "ambient: the node's health probes arrive from this address (SNAT on the node); never captured."),
    _opt("ambient_probe_address_v6", "ambient-probe-address-v6", None, ("HOST_PROBE_SNAT_IPV6",),
         v.parse_ipv6_host, "fd16:9254:7127:1337:ffff:ffff:ffff:ffff", "str",
         "ambient: the IPv6 address the node's health probes arrive from."),
    _opt("network_namespace", "network-namespace", None, ("NETWORK_NAMESPACE",), v.parse_text, "", "str",
         "Accepted for compatibility; ignored (run interceptd inside the namespace).", "compat"),
    _opt("cni_mode", "cni-mode", None, ("CNI_MODE",), v.parse_bool, "false", "bool",
         "Accepted for compatibility; ignored.", "compat"),
    _opt("reconcile", "reconcile", None, ("RECONCILE",), v.parse_bool, "false", "bool",
         "Accepted for compatibility; every apply replaces the table atomically.", "compat"),
    _opt("cleanup_only", "cleanup-only", None, ("CLEANUP_ONLY",), v.parse_bool, "false", "bool",
         "Remove everything interceptd installed instead of installing."),
    _opt("force_apply", "force-apply", None, ("FORCE_APPLY",), v.parse_bool, "false", "bool",
         "Accepted for compatibility; ignored.", "compat"),
    _opt("native_nftables", "native-nftables", None, ("NATIVE_NFTABLES",), v.parse_bool, "false", "bool",
         "Accepted for compatibility; interceptd always uses nftables.", "compat"),
    _opt("force_iptables_binary", "force-iptables-binary", None, ("FORCE_IPTABLES_BINARY",),
         v.parse_iptables_binary, "", "str", "Accepted for compatibility (validated, then ignored).", "compat"),
    _opt("outbound_owner_groups", "outbound-owner-groups", None, ("ISTIO_OUTBOUND_OWNER_GROUPS",),
         v.parse_owner_groups, "*", "list",
         "Groups whose outbound traffic may be captured ('*' = all; set but empty = none, as in Istio)."),
    _opt("outbound_owner_groups_exclude", "outbound-owner-groups-exclude", None,
         ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",), v.parse_id_names, "", "list",
         "Groups whose outbound traffic is never captured (only with owner groups '*')."),
    _opt("outbound_ipv4_loopback_cidr", "outbound-ipv4-loopback-cidr", None,
         ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",), v.parse_loopback_cidr, "127.0.0.1/32", "str",
         "IPv4 loopback destinations never captured."),
    _opt("envoy_user", "envoy-user", None, ("ENVOY_USER",), v.parse_id_name, "istio-proxy", "str",
         "User whose uid is the default --proxy-uid."),
    _opt("table", "table", None, ("INTERCEPTD_TABLE",), v.parse_table_name, "interceptd", "str",
         "Name of interceptd's own inet table (no other table is ever touched).", "agent"),
    _opt("resolv_conf", "resolv-conf", None, ("INTERCEPTD_RESOLV_CONF",), v.parse_path, "/etc/resolv.conf",
         "str", "Where DNS capture reads the nameservers from.", "agent"),
    _opt("reconcile_interval", "reconcile-interval", None, ("INTERCEPTD_RECONCILE_INTERVAL",),
         v.parse_seconds, "10", "float", "run: seconds between periodic drift checks (the backstop).", "agent"),
    _opt("kernel_events", "kernel-events", None, ("INTERCEPTD_KERNEL_EVENTS",), v.parse_bool, "true", "bool",
         "run: react to nftables change events at once (else only the periodic check).", "agent"),
    _opt("cleanup_on_exit", "cleanup-on-exit", None, ("INTERCEPTD_CLEANUP_ON_EXIT",), v.parse_bool, "false",
         "bool", "run: remove the rules when the agent stops (default: keep them; fail closed).", "agent"),
    _opt("own_table", "own-table", None, ("INTERCEPTD_OWN_TABLE",), v.parse_bool, "false", "bool",
         "run: create the table with nftables' owner flag, so no other process can flush, edit or delete it "
         "(drift becomes impossible). Without the persist flag (libnftables < 1.1, kernel < 6.9) the table also "
         "goes away when the agent exits: traffic is not captured until it starts again.", "agent"),
    _opt("metrics_address", "metrics-address", None, ("INTERCEPTD_METRICS_ADDRESS",), v.parse_address,
         "127.0.0.1:15321", "str",
         "run: HOST:PORT of /metrics, /healthz and /readyz ('' = off). Port 15321 is used by no mesh. "
         "A non-loopback address exempts the port from inbound capture.",
         "agent"),
    _opt("state_dir", "state-dir", None, ("INTERCEPTD_STATE_DIR",), v.parse_path, "/run/interceptd", "str",
         "run, node: directory of the lock file; node: also of its socket and per-namespace state. Created with "
         "mode 0700; one that other users can write to is refused (name a subdirectory of it).", "agent"),
    _opt("netns_dir", "netns-dir", None, ("INTERCEPTD_NETNS_DIR",), v.parse_optional_path, "/run/netns", "str",
         "node: directory of network namespace files to keep intercepted, each with this configuration "
         "('' = none; CNI-registered namespaces are kept either way). It must belong to root and be writable by "
         "root only; only root's namespace bind mounts in it are taken (no symlinks, never the agent's own "
         "namespace), and pods whose CNI ADD opted out stay out.", "agent"),
    _opt("netns_config_dir", "netns-config-dir", None, ("INTERCEPTD_NETNS_CONFIG_DIR",), v.parse_path,
         "/etc/interceptd/netns.d", "str",
         "node: live per-pod settings, watched: K8SNAMESPACE_POD.toml (a CNI pod's Kubernetes namespace and name) "
         "or NAME.toml (its network namespace's name) overrides that pod's keys while it runs; a ConfigMap "
         "mount works.",
         "agent"),
    _opt("ambient_host_rules", "ambient-host-rules", None, ("INTERCEPTD_AMBIENT_HOST_RULES",), v.parse_bool,
         "false", "bool",
         "node: keep the host probe table (inet interceptd-host) in the node's own namespace: the kubelet's TCP "
         "to an ambient pod is SNATed to --ambient-probe-address(-v6), which the pod's rules let through. The "
         "only thing interceptd writes outside pod namespaces; off by default.", "agent"),
    _opt("kubelet_uid", "kubelet-uid", None, ("INTERCEPTD_KUBELET_UID",), v.parse_uid, "0", "int",
         "node: with --ambient-host-rules, the uid of the kubelet, whose probes are SNATed.", "agent"),
    _opt("log_level", "log-level", None, ("INTERCEPTD_LOG_LEVEL",), v.parse_log_level, "info", "str",
         "debug, info, warning or error.", "agent"),
    _opt("log_format", "log-format", None, ("INTERCEPTD_LOG_FORMAT",), v.parse_log_format, "auto", "str",
         "auto (console on a terminal, JSON lines otherwise), json or console.", "agent"),
)

OPTIONS_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}


@record
class Config:
    """The validated, typed configuration; built only by `load`."""

    envoy_port: int
    inbound_capture_port: int
    inbound_tunnel_port: int
    proxy_uid: tuple[int, ...]
    proxy_gid: tuple[int, ...]
    inbound_interception_mode: str
    inbound_tproxy_mark: int
    inbound_tproxy_route_table: int
    inbound_ports: tuple[v.PortRange, ...] | None  # None = '*'
    local_exclude_ports: tuple[v.PortRange, ...]
    exclude_interfaces: tuple[str, ...]
    service_cidr: tuple[v.IPNetwork, ...] | None  # None = '*'
    service_exclude_cidr: tuple[v.IPNetwork, ...]
    outbound_ports: tuple[v.PortRange, ...]
    local_outbound_ports_exclude: tuple[v.PortRange, ...]
    kube_virt_interfaces: tuple[str, ...]
    dry_run: bool
    iptables_probe_port: int
    probe_timeout: float
    skip_rule_apply: bool
    run_validation: bool
    redirect_dns: bool
    capture_all_dns: bool
    drop_invalid: bool
    dual_stack: bool
    capture_mode: str
    ambient_ingress: bool
    ambient_dns_port: int
    ambient_mark: int
    ambient_connmark: int
    ambient_mark_mask: int
    ambient_route_table: int
    ambient_probe_address: v.Prefix  # an IPv4 host prefix (/32)
    ambient_probe_address_v6: v.Prefix  # an IPv6 host prefix (/128)
    network_namespace: str
    cni_mode: bool
    reconcile: bool
    cleanup_only: bool
    force_apply: bool
    native_nftables: bool
    force_iptables_binary: str
    outbound_owner_groups: tuple[int, ...] | None  # None = '*'
    outbound_owner_groups_exclude: tuple[int, ...]
    outbound_ipv4_loopback_cidr: v.Prefix  # IPv4
    envoy_user: str
    table: str
    resolv_conf: str
    reconcile_interval: float
    kernel_events: bool
    cleanup_on_exit: bool
    own_table: bool
    metrics_address: tuple[str, int] | None
    state_dir: str
    netns_dir: str
    netns_config_dir: str
    ambient_host_rules: bool
    kubelet_uid: int
    log_level: str
    log_format: str

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode == "TPROXY"

    @property
    def ambient(self) -> bool:
        return self.capture_mode == "ambient"


def _toml_text(option: Option, value: object, path: str) -> str:
    """Turn a TOML value into the option's text form, refusing the wrong TOML type."""
    where = f"--config {path!r} key {option.key!r}"
    if option.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return "true" if value else "false"
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_KIND_WORD[option.kind]}, got {value!r}")
    if option.kind == "list" and isinstance(value, list):
        if len(value) > v.MAX_LIST_ITEMS:
            raise ConfigError(f"{where}: {len(value)} items, more than the limit of {v.MAX_LIST_ITEMS}")
        kinds = set(map(type, value))  # one pass in C over what can be 200,000 items
        if kinds == {str}:
            return ",".join(value)
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise ConfigError(f"{where}: list items must be numbers or strings, got {item!r}")
        return ",".join(map(str, value))
    if option.kind == "list" and isinstance(value, int):
        return str(value)  # `proxy_uid = 1337`: one id is as natural as a list of one
    if option.kind in ("int", "float") and isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and option.kind in ("str", "list", "int", "float"):
        return value
    raise ConfigError(f"{where}: expected {_KIND_WORD[option.kind]}, got {value!r}")


_KIND_WORD = {"bool": "true or false", "int": "a number", "list": "a list or a comma-separated string",
              "str": "a string", "float": "a number"}


# The fast TOML reader's grammar: one `key = value` per line, the value a string without escapes, a decimal
# integer, a boolean or a one-line array of those. TOML's whitespace is space and tab; a string holds no
# control character but tab (the whole text is checked for those first).
_TOML_SCALAR = r"""(?:"[^"\\]*"|'[^']*'|[+-]?(?:0|[1-9][0-9]{0,17})|true|false)"""


@functools.cache
def _toml_patterns() -> tuple[re.Pattern[str], ...]:
    """Compiled at the first TOML file (0.3 ms), like tomllib's own; flags-only commands never pay for it."""
    item = rf"{_TOML_SCALAR}[ \t]*"
    string_item = r'"[^"\\]*"[ \t]*'
    return (re.compile(r"[\x00-\x08\x0b-\x1f\x7f]"),  # control characters but tab and newline
            re.compile(r"[ \t]*(?:#.*)?"),  # a blank or comment line
            re.compile(r"[ \t]*([A-Za-z0-9_-]+)[ \t]*=[ \t]*(.*)"),  # key = value (greedy: linear time)
            re.compile(_TOML_SCALAR),
            re.compile(rf"\[[ \t]*(?:{item},[ \t]*)*(?:{item})?\]"),  # an array, trailing comma allowed
            re.compile(rf"\[[ \t]*(?:{string_item},[ \t]*)*(?:{string_item})?\]"),  # an array of strings only
            re.compile(r""""([^"]*)"|'([^']*)'|([+-]?[0-9]+)|(true|false)"""),  # the items of a checked array
            re.compile(r'"([^"]*)"'))  # the strings of a checked array of strings


def _toml_scalar(token: str) -> object:
    if token[0] in "\"'":
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    return int(token)


def simple_toml(text: str) -> dict[str, object] | None:
    """The settings of a TOML text in the shape a settings file usually has (blank lines, `#` comment lines,
    top-level `key = value` lines whose value is a one-line string without escapes, a decimal integer, a
    boolean or a one-line array of those), read with a few regular expressions; None for anything else
    (tables, dotted or quoted keys, escapes, multi-line values, trailing comments, floats, dates, a repeated
    key, carriage returns, ...), which tomllib then reads whole, so its errors and edge cases stay its own.
    Why: tomllib spends 2 us on every array item, 20 ms on a file of 10,000 excluded CIDRs."""
    control, blank, pair, scalar, array, string_array, array_items, strings = _toml_patterns()
    if control.search(text) is not None:
        return None
    out: dict[str, object] = {}
    for line in text.split("\n"):
        if blank.fullmatch(line):
            continue
        kv = pair.fullmatch(line)
        if kv is None:
            return None
        key, value = kv[1], kv[2].rstrip(" \t")
        if key in out:
            return None
        if scalar.fullmatch(value):
            out[key] = _toml_scalar(value)
        elif string_array.fullmatch(value):
            out[key] = strings.findall(value)
        elif array.fullmatch(value):
            # Each item matched one alternative: a number, a boolean, or a string (basic or literal, maybe empty).
            out[key] = [int(n) if n else b == "true" if b else s or q for s, q, n, b in array_items.findall(value)]
        else:
            return None
    return out


def read_toml(path: str) -> dict[str, object]:
    """The TOML file's settings, keys checked. tomllib is imported only for a file simple_toml leaves to it: its
    import compiles a dozen regular expressions (about 5 ms)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(v.MAX_CONFIG_BYTES + 1)
        if len(raw) > v.MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path!r}: larger than the limit of {v.MAX_CONFIG_BYTES} bytes")
        text = raw.decode()
        data = simple_toml(text)
        if data is None:
            import tomllib

            data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"--config: file {path!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path!r}: not UTF-8 text (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        # TOMLDecodeError, an integer over Python's 4,300-digit limit (ValueError), arrays or tables nested
        # past the interpreter's recursion limit.
        reason = str(exc).splitlines()[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise ConfigError(f"--config {path!r}: TOML syntax error: {reason}") from None
    except OSError as exc:
        raise ConfigError(f"--config {path!r}: cannot read: {exc.strerror}") from None
    for key in data:
        if key not in OPTIONS_BY_KEY:
            raise ConfigError(f"--config {path!r}: unknown key {key!r}{did_you_mean(key, OPTIONS_BY_KEY)}")
    return data


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest known spelling, or nothing: a typo should not cost a manual.
    difflib is imported only when there is a typo to answer."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(option: Option, text: str, where: str) -> Any:
    # Counted before parsing, so a huge list costs a scan of its text, not the parse of every item.
    if option.kind == "list" and text.count(",") >= v.MAX_LIST_ITEMS:
        raise ConfigError(f"{where}: more than the limit of {v.MAX_LIST_ITEMS} list items")
    try:
        return option.parse(text)
    except ValueError as exc:
        shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
        raise ConfigError(f"{where}: invalid value {shown!r}: {exc}") from None


def load(flags: Mapping[str, str], env: Mapping[str, str], toml: Mapping[str, object] | None = None,
         toml_path: str = "") -> Config:
    """Build the Config; `flags` maps option keys to the text given on the command line."""
    raw: dict[str, Any] = {}
    given: set[str] = set()
    for option in OPTIONS:
        value = _parse(option, option.default, f"default of {option.flag}")
        if toml is not None and option.key in toml:
            text = _toml_text(option, toml[option.key], toml_path)
            value = _parse(option, text, f"--config {toml_path!r} key {option.key!r}")
            given.add(option.key)
        for name in option.envs:
            if name in env:
                value = _parse(option, env[name], f"environment variable {name}")
                given.add(option.key)
        if option.key in flags:
            short = f"-{option.short}/" if option.short else ""
            value = _parse(option, flags[option.key], f"flag {short}{option.flag}")
            given.add(option.key)
        raw[option.key] = value

    uid_names: tuple[str, ...] = raw["proxy_uid"] or (_default_uid(raw["envoy_user"]),)
    gid_names: tuple[str, ...] = raw["proxy_gid"] or uid_names
    raw["proxy_uid"] = _resolve(uid_names, v.resolve_uid, "proxy_uid", "--proxy-uid")
    gid_flag = "--proxy-gid" if raw["proxy_gid"] else "--proxy-gid, which defaults to the --proxy-uid list"
    raw["proxy_gid"] = _resolve(gid_names, v.resolve_gid, "proxy_gid", gid_flag)
    groups = raw["outbound_owner_groups"]
    if groups is not None:
        raw["outbound_owner_groups"] = _resolve(groups, v.resolve_gid, "outbound_owner_groups",
                                                "--outbound-owner-groups")
    raw["outbound_owner_groups_exclude"] = _resolve(raw["outbound_owner_groups_exclude"], v.resolve_gid,
                                                    "outbound_owner_groups_exclude",
                                                    "--outbound-owner-groups-exclude")
    _check_ambient(raw)
    return Config(**raw)


def _check_ambient(raw: Mapping[str, Any]) -> None:
    """Ambient settings that would install rules which never match, or fight each other, are refused."""
    if raw["capture_mode"] != "ambient":
        return
    if raw["inbound_interception_mode"] == "TPROXY":
        raise ConfigError("--capture-mode ambient: invalid value with --istio-inbound-interception-mode TPROXY "
                          "(the node proxy's inbound capture is REDIRECT)")
    if raw["run_validation"]:
        raise ConfigError("--run-validation: invalid value true with --capture-mode ambient (the self-test checks "
                          "the sidecar proxy's uid-based in-redirect, which ambient mode has not)")
    mask = raw["ambient_mark_mask"]
    for key in ("ambient_mark", "ambient_connmark"):
        if raw[key] & ~mask:
            raise ConfigError(f"--{key.replace('_', '-')} (key {key!r}): invalid value {raw[key]:#x}: bits outside "
                              f"--ambient-mark-mask {mask:#x}")
    if raw["ambient_mark"] == raw["ambient_connmark"]:
        raise ConfigError(f"--ambient-connmark (key 'ambient_connmark'): invalid value {raw['ambient_connmark']:#x}: "
                          "equal to --ambient-mark")


def _default_uid(user: str) -> str:
    try:
        return str(pwd.getpwnam(user).pw_uid)
    except KeyError:
        return "1337"


def _resolve(names: tuple[str, ...], resolve: Callable[[str], int], key: str, flag: str) -> tuple[int, ...]:
    out: list[int] = []
    for name in names:
        try:
            number = resolve(name)
        except ValueError as exc:
            raise ConfigError(f"{flag} (key {key!r}): invalid value {name!r}: {exc}") from None
        if number not in out:
            out.append(number)
    return tuple(out)


def load_all(flags: Mapping[str, str], env: Mapping[str, str] | None = None, config_path: str | None = None,
             ) -> Config:
    """The full precedence chain, reading the TOML file when one is named."""
    toml = read_toml(config_path) if config_path else None
    return load(flags, os.environ if env is None else env, toml, config_path or "")

