"""`interceptd-cni`: a chained CNI 1.0 plugin that installs a pod's interception itself, then tells the node agent.

ADD builds the pod's Config (Istio CNI's defaults, see docs/istio-compatibility.md "How Istio calls it" < the
network config's "interceptd" object <
Istio annotation names in CNI_ARGS), applies it inside CNI_NETNS in one transaction (so a pod never starts
unprotected, even while the node agent is down), records it in the state directory and registers it with
the node agent (best effort). ADD succeeds only once the table read back from CNI_NETNS decides exactly as
the rendered ruleset; otherwise it removes the table and fails (fail closed). CHECK compares the kernel with
that record. DEL unregisters and removes the table if the namespace still exists, and never fails because
something is already gone.

Errors are the CNI specification's error JSON on stdout with a non-zero exit; every configuration error is found before
the namespace is touched, and a refused transaction changes nothing, so a failed ADD leaves no rules.
"""

from __future__ import annotations

import json
import os
import sys

from interceptd.cli.main import exit_one_shot
from interceptd.config import OPTIONS_BY_KEY, Config
from interceptd.config.values import MAX_CONFIG_BYTES, address_value
from interceptd.control import install
from interceptd.errors import ConfigError, InterceptdError, KernelRefusedError, NamespaceError, ReadBackError
from interceptd.records import record
from interceptd.ruleset import drift
from interceptd.ruleset.nftjson import Existing, normalise, transaction
from interceptd.ruleset.render import render
from interceptd.runtime import nodestate
from interceptd.system import host, netns
from interceptd.system.kernel import Kernel, NftKernel
from interceptd.system.routes import Netlink

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, NoReturn

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_SINCE = "0.4.0"

# CNI error codes (1-99 are the CNI specification's; 100+ the plugin's own).
E_VERSION, E_FIELD, E_UNKNOWN_CONTAINER, E_ENV, E_IO, E_DECODE, E_CONFIG = 1, 2, 3, 4, 5, 6, 7
E_REFUSED, E_MISMATCH, E_READBACK = 100, 101, 102
# Test-only: an nft JSON document the plugin applies in the pod's namespace between ADD's transaction and its
# read-back, standing for another process that changes the table right then (tests of the fail-closed ADD).
TEST_AFTER_APPLY_ENV = "INTERCEPTD_CNI_TEST_AFTER_APPLY"
# The pod's Kubernetes namespace and name, as kubelet, CRI-O and podman pass them in CNI_ARGS: recorded so the
# node agent can find the pod's live settings file and label its metrics.
K8S_NAMESPACE_ARG, K8S_POD_ARG = "K8S_POD_NAMESPACE", "K8S_POD_NAME"

# Istio CNI's settings for a pod without annotations (docs/istio-compatibility.md, "How Istio calls it"), as
# Config keys.
ISTIO_CNI_DEFAULTS: dict[str, Any] = {
    "proxy_uid": "1337",
    "proxy_gid": "1337",
    "inbound_interception_mode": "REDIRECT",
    "service_cidr": "*",
    "service_exclude_cidr": "",
    "inbound_ports": "*",
    "local_exclude_ports": "15020",
    "outbound_ports": "",
    "local_outbound_ports_exclude": "15020",
    "kube_virt_interfaces": "",
    "exclude_interfaces": "",
}
# Always excluded inbound, whatever the annotation says: the sidecar's own ports (Istio appends them too).
SIDECAR_INBOUND_PORTS = ("15020", "15021", "15090")

# Istio's pod annotations, when the runtime passes them in CNI_ARGS, and the Config key each one sets.
ANNOTATIONS: dict[str, str] = {
    "traffic.sidecar.istio.io/includeOutboundIPRanges": "service_cidr",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "service_exclude_cidr",
    "traffic.sidecar.istio.io/includeInboundPorts": "inbound_ports",
    "traffic.sidecar.istio.io/excludeInboundPorts": "local_exclude_ports",
    "traffic.sidecar.istio.io/includeOutboundPorts": "outbound_ports",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "local_outbound_ports_exclude",
    "traffic.sidecar.istio.io/kubevirtInterfaces": "kube_virt_interfaces",
    "traffic.sidecar.istio.io/excludeInterfaces": "exclude_interfaces",
    "sidecar.istio.io/interceptionMode": "inbound_interception_mode",
}
NO_INTERCEPTION = "NONE"  # sidecar.istio.io/interceptionMode=NONE: Istio leaves such a pod alone
# A pod labelled istio.io/dataplane-mode=ambient (when the runtime passes the label in CNI_ARGS) gets the ambient
# in-pod rules, and Istio's ambient annotations instead of the sidecar ones.
DATAPLANE_MODE_LABEL, AMBIENT = "istio.io/dataplane-mode", "ambient"
NO_DATAPLANE = "none"  # istio.io/dataplane-mode=none: Istio leaves the pod out of ambient
AMBIENT_ANNOTATIONS: dict[str, str] = {
    "ambient.istio.io/dns-capture": "redirect_dns",
    "ambient.istio.io/bypass-inbound-capture": "ambient_ingress",
    "istio.io/reroute-virtual-interfaces": "kube_virt_interfaces",
}


class CniError(Exception):
    """Ends the plugin with the CNI specification's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@record
class Request:
    command: str
    conf: dict[str, Any]
    version: str
    container_id: str
    netns_path: str
    args: dict[str, str]  # CNI_ARGS
    test_after_apply: str = ""  # TEST_AFTER_APPLY_ENV


def parse_cni_args(text: str) -> dict[str, str]:
    """`K=V;K=V` (values may hold '=' and ','); an element without '=' is malformed."""
    out: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CniError(E_ENV, f"CNI_ARGS: malformed element {item!r} (expected KEY=VALUE)")
        out[key] = value
    return out


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def parse_request(env: Mapping[str, str], stdin: str) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "CHECK", "DEL", "VERSION"):
        raise CniError(E_ENV, f"CNI_COMMAND: invalid value {command!r} (expected ADD, CHECK, DEL or VERSION)")
    if len(stdin) > MAX_CONFIG_BYTES:
        raise CniError(E_DECODE, f"network configuration on stdin is larger than the limit of {MAX_CONFIG_BYTES} "
                       "characters")
    try:
        conf = json.loads(stdin) if stdin.strip() or command != "VERSION" else {}
    except ValueError as exc:
        raise CniError(E_DECODE, f"network configuration on stdin is not JSON: {exc}") from None
    except RecursionError:
        raise CniError(E_DECODE, "network configuration on stdin is not JSON: nested too deeply") from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "network configuration on stdin must be a JSON object")
    version = conf.get("cniVersion", "1.0.0" if command == "VERSION" else "")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E_VERSION, f"cniVersion {version!r} is not supported (supported: "
                       f"{', '.join(SUPPORTED_VERSIONS)})")
    if command == "VERSION":
        return Request(command, conf, version, "", "", {})
    for key in ("name", "type"):
        if not isinstance(conf.get(key), str) or not conf[key]:
            raise CniError(E_CONFIG, f"network configuration: {key!r} must be a non-empty string")
    needed = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME") if command != "DEL" else ("CNI_CONTAINERID", "CNI_IFNAME")
    for name in needed:
        if not env.get(name):
            raise CniError(E_ENV, f"environment variable {name} is missing or empty")
    if command == "CHECK" and _version_tuple(version) < _version_tuple(CHECK_SINCE):
        raise CniError(E_VERSION, f"CHECK needs cniVersion {CHECK_SINCE} or later, got {version!r}")
    return Request(command, conf, version, env["CNI_CONTAINERID"], env.get("CNI_NETNS", ""),
                   parse_cni_args(env.get("CNI_ARGS", "")), env.get(TEST_AFTER_APPLY_ENV, ""))


def _text(key: str, value: object, where: str) -> str:
    """An annotation's value, checked with the option's own parser so the error names the annotation."""
    text = str(value)
    try:
        OPTIONS_BY_KEY[key].parse(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid value {text!r}: {exc}") from None
    return text


def pod_settings(conf: Mapping[str, Any], args: Mapping[str, str]) -> dict[str, Any] | None:
    """The pod's settings as TOML keys, or None when the pod is not to be intercepted."""
    own = conf.get("interceptd", {})
    if not isinstance(own, dict):
        raise ConfigError("network configuration: 'interceptd' must be an object with interceptd's TOML keys")
    for key in own:
        if key not in OPTIONS_BY_KEY:
            raise ConfigError(f"network configuration 'interceptd': unknown key {key!r}")
    if own.get("own_table") is True:
        raise ConfigError("network configuration 'interceptd': key 'own_table' cannot be used with the CNI plugin: "
                          "an owned table belongs to the process that made it, and the plugin exits at once")
    excluded = conf.get("exclude_namespaces", [])
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise ConfigError("network configuration: 'exclude_namespaces' must be a list of strings")
    if args.get("K8S_POD_NAMESPACE") in excluded:
        return None
    settings: dict[str, Any] = {**ISTIO_CNI_DEFAULTS, **own}
    if args.get(DATAPLANE_MODE_LABEL) == AMBIENT:
        settings["capture_mode"] = AMBIENT
    ambient = settings.get("capture_mode") == AMBIENT
    if ambient and args.get(DATAPLANE_MODE_LABEL) == NO_DATAPLANE:
        return None
    for annotation, key in (AMBIENT_ANNOTATIONS if ambient else ANNOTATIONS).items():
        if annotation in args:
            if key == "inbound_interception_mode" and args[annotation] == NO_INTERCEPTION:
                return None
            value = args[annotation]
            if annotation in AMBIENT_ANNOTATIONS and key == "kube_virt_interfaces":
                value = ",".join(name.strip() for name in value.split(","))  # Istio trims each name
            text = _text(key, value, f"CNI_ARGS {annotation}")
            option = OPTIONS_BY_KEY[key]  # the settings are TOML keys: a bool annotation becomes a TOML bool
            settings[key] = option.parse(text) if option.kind == "bool" else text
    if settings.get("redirect_dns") is True:
        settings.setdefault("capture_all_dns", True)  # Istio CNI too: the pod's resolv.conf is not the node's
    excluded_in = settings["local_exclude_ports"]
    ports = excluded_in if isinstance(excluded_in, list) else str(excluded_in).split(",")
    merged = [str(p) for p in ports if str(p)]
    settings["local_exclude_ports"] = ",".join(dict.fromkeys([*merged, *SIDECAR_INBOUND_PORTS]))
    return settings


def _result(request: Request) -> dict[str, Any]:
    """ADD's output: the previous plugin's result, passed through (interceptd adds no interface)."""
    prev = request.conf.get("prevResult")
    result: dict[str, Any] = dict(prev) if isinstance(prev, dict) else {}
    result["cniVersion"] = request.version
    return result


def pod_addresses(prev: object) -> tuple[str, ...]:
    """The pod's addresses in the previous plugin's result (`ips[].address`, CIDR notation), as plain
    addresses; entries that are not addresses are skipped (the result is another plugin's, not ours to judge)."""
    ips = prev.get("ips") if isinstance(prev, dict) else None
    found: list[str] = []
    for entry in ips if isinstance(ips, list) else []:
        text = entry.get("address") if isinstance(entry, dict) else None
        try:
            address = _interface_address(text) if isinstance(text, str) else ""
        except ValueError:
            continue
        if address and address not in found:
            found.append(address)
    return tuple(found)


def _interface_address(text: str) -> str:
    """str(ipaddress.ip_interface(text).ip): an IPAM plugin writes ADDRESS/LENGTH the way ipaddress does, and
    that spelling is read without importing ipaddress (1 ms of each pod's ADD); any other is ipaddress'."""
    address, slash, length = text.partition("/")
    plain = address_value(address)
    if plain is not None and (not slash or (length.isascii() and length.isdigit()
                                            and int(length) <= (32 if plain[0] == 4 else 128))):
        return address
    import ipaddress

    return str(ipaddress.ip_interface(text).ip)


def _config(request: Request) -> tuple[Config, dict[str, Any]] | None:
    try:
        settings = pod_settings(request.conf, request.args)
        if settings is None:
            return None
        return nodestate.settings_config(settings, "CNI network config"), settings
    except ConfigError as exc:
        raise CniError(E_CONFIG, str(exc)) from None


def _own(request: Request) -> dict[str, Any]:
    own = request.conf.get("interceptd", {})
    return own if isinstance(own, dict) else {}


def _state_dir(request: Request) -> str:
    return str(_own(request).get("state_dir") or OPTIONS_BY_KEY["state_dir"].default)


def _namespace(request: Request) -> str:
    """CNI_NETNS as a network namespace that exists, or error 3 (container unknown)."""
    if netns.identity(request.netns_path) is None:
        raise CniError(E_UNKNOWN_CONTAINER, f"CNI_NETNS {request.netns_path!r} is not a network namespace")
    return request.netns_path


def _name(path: str) -> str:
    try:
        return netns.name_for(path)
    except NamespaceError as exc:
        raise CniError(E_ENV, str(exc)) from None


def _after_apply(request: Request) -> Callable[[Kernel], None]:
    """The test-only change between apply and read-back (TEST_AFTER_APPLY_ENV); nothing without it."""
    text = request.test_after_apply
    if not text:
        return lambda kernel: None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise CniError(E_ENV, f"{TEST_AFTER_APPLY_ENV}: not JSON: {exc}") from None
    return lambda kernel: kernel.apply(document)


def _pod(request: Request) -> tuple[str, str]:
    return request.args.get(K8S_NAMESPACE_ARG, ""), request.args.get(K8S_POD_ARG, "")


def cmd_add(request: Request) -> dict[str, Any]:
    found = _config(request)
    path = _namespace(request)
    name = _name(path)
    if found is None:
        # Recorded all the same: a node agent that also watches the directory this namespace shows in (/run/netns)
        # must leave an opted-out pod alone, and learns it from this record.
        nodestate.write(_state_dir(request), nodestate.Record(name, path, "cni", {}, [],
                                                              container_id=request.container_id, opted_out=True))
        _tell_agent(_state_dir(request), {"op": "add", "name": name})
        return _result(request)
    config, settings = found
    state_dir = _state_dir(request)
    after_apply = _after_apply(request)
    try:
        with netns.entered(path):
            ruleset = render(config, host.detect(config))
            if config.dry_run:
                # As the CLI's --dry-run: rendered (so validated) and shown, never applied; stdout is the result's.
                print(json.dumps(transaction(ruleset, Existing.empty())), file=sys.stderr)
                return _result(request)
            try:
                kernel = NftKernel()
                # No reference from apply's own listing: the read-back below takes it, stricter, once.
                applied = install.apply(kernel, Netlink(), ruleset, reference=False)
                after_apply(kernel)
                applied = install.verified(kernel, ruleset, applied)
                nodestate.write(state_dir, nodestate.Record(
                    name, path, "cni", settings, applied.listing, nodestate.ruleset_digest(ruleset),
                    request.container_id, addresses=pod_addresses(request.conf.get("prevResult")), pod=_pod(request)))
            except (InterceptdError, OSError):
                # A failed ADD leaves no rules: the runtime retries or gives up on the pod, and a half-made
                # table (say the routes failed after the transaction) would capture without a record of it.
                install.remove(NftKernel(), Netlink(), config.table)
                raise
    except ConfigError as exc:
        raise CniError(E_CONFIG, str(exc)) from None
    except KernelRefusedError as exc:
        raise CniError(E_REFUSED, str(exc)) from None
    except ReadBackError as exc:
        raise CniError(E_READBACK, f"network namespace {name}: {exc}; the table was removed") from None
    except InterceptdError as exc:  # namespace, routes, addresses
        raise CniError(E_IO, str(exc)) from None
    except OSError as exc:
        raise CniError(E_IO, f"state directory {state_dir!r}: {exc.strerror or exc}") from None
    _tell_agent(state_dir, {"op": "add", "name": name})
    return _result(request)


def cmd_check(request: Request) -> dict[str, Any]:
    found = _config(request)
    path = _namespace(request)
    name = _name(path)
    if found is None or found[0].dry_run:  # a dry-run ADD applied nothing: there is nothing to check
        return {}
    config, settings = found
    record = nodestate.read(_state_dir(request), name)
    if record is None:
        raise CniError(E_MISMATCH, f"network namespace {name}: interceptd has no record of an ADD for it")
    # The settings, not the rendered ruleset: the node agent may have applied the pod's live settings file
    # since ADD, and rewritten the record's reference listing with them.
    if json.loads(json.dumps(settings)) != record.settings:
        raise CniError(E_MISMATCH, f"network namespace {name}: the pod's network configuration now holds other "
                       f"settings than ADD applied: another ruleset")
    try:
        with netns.entered(path):
            kernel = NftKernel()
        listing = kernel.list_table(config.table)
    except ConfigError as exc:
        raise CniError(E_CONFIG, str(exc)) from None
    except InterceptdError as exc:
        raise CniError(E_IO, str(exc)) from None
    differences = ([drift.Difference("table missing", f"table inet {config.table} is missing")] if listing is None
                   else drift.compare(record.listing, normalise(listing)))
    if differences:
        raise CniError(E_MISMATCH, f"network namespace {name}: the ruleset does not match what ADD applied",
                       "; ".join(drift.summary(differences)))
    return {}


def cmd_del(request: Request) -> dict[str, Any]:
    state_dir = _state_dir(request)
    path = request.netns_path
    gone = not path or netns.identity(path) is None
    record = None
    try:
        name = netns.name_for(path) if path else ""
    except NamespaceError:
        name = ""
    if name:
        record = nodestate.read(state_dir, name)
        # Unregister first: an agent that still knew the pod would take the table's removal for drift.
        _tell_agent(state_dir, {"op": "del", "name": name})
        nodestate.remove(state_dir, name)
    if gone or _own(request).get("dry_run") is True:  # a dry-run ADD applied nothing: leave the kernel alone
        return {}
    table = record.config().table if record is not None else str(_own(request).get("table") or
                                                                  OPTIONS_BY_KEY["table"].default)
    try:
        with netns.entered(path):
            install.remove(NftKernel(), Netlink(), table)
    except NamespaceError:
        pass  # the namespace went away meanwhile: nothing left to remove
    except InterceptdError as exc:
        raise CniError(E_IO, str(exc)) from None
    return {}


def _tell_agent(state_dir: str, message: dict[str, Any]) -> None:
    """Best effort: without an agent the pod is protected all the same; the agent adopts it when it starts."""
    try:
        reply = nodestate.request(state_dir, message)
    except (OSError, ValueError) as exc:
        _warn(f"node agent not reachable at {nodestate.socket_path(state_dir)!r} ({exc}); it will find "
              f"the namespace at its next start or scan")
        return
    if not reply.get("ok"):
        _warn(f"node agent: {reply.get('error', 'refused')}")


def _warn(text: str) -> None:
    print(f"interceptd-cni: warning: {text}", file=sys.stderr)


def run(env: Mapping[str, str], stdin: str) -> tuple[int, dict[str, Any]]:
    """Exit code and the JSON for stdout."""
    version = "1.0.0"
    try:
        request = parse_request(env, stdin)
        version = request.version
        if request.command == "VERSION":
            return 0, {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
        handler = {"ADD": cmd_add, "CHECK": cmd_check, "DEL": cmd_del}[request.command]
        return 0, handler(request)
    except CniError as exc:
        error: dict[str, Any] = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
        if exc.details:
            error["details"] = exc.details
        return 1, error


def install_settings(text: str) -> dict[str, Any]:
    """The `interceptd` object `install` writes into the conflist, checked as ADD will check it: settings
    that every later ADD would refuse are refused now, when the DaemonSet's init step can still fail."""
    try:
        own = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"SETTINGS_JSON: not JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("SETTINGS_JSON: not JSON: nested too deeply") from None
    settings = pod_settings({"interceptd": own}, {})
    if settings is not None:
        nodestate.settings_config(settings, "SETTINGS_JSON")
    return dict(own)


def install_conflist(conf_dir: str, plugin: dict[str, Any]) -> str:
    """Chain `plugin` last in the node's network: the first .conflist in name order, the one runtimes use.

    Re-running replaces the earlier entry (an upgrade), so the chain never holds interceptd-cni twice.
    """
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(".conflist"))
    except OSError as exc:
        raise ConfigError(f"CNI configuration directory {conf_dir!r}: {exc.strerror}") from None
    if not names:
        raise ConfigError(f"CNI configuration directory {conf_dir!r}: no .conflist to chain into (is the "
                          f"network plugin installed yet?)")
    path = os.path.join(conf_dir, names[0])
    try:
        with open(path, encoding="utf-8") as fh:
            conf = json.load(fh)
        plugins = [p for p in conf["plugins"] if p.get("type") != plugin["type"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ConfigError(f"{path!r}: not a CNI conflist: {str(exc) or type(exc).__name__}") from None
    conf["plugins"] = [*plugins, plugin]
    tmp = f"{path}.interceptd.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(conf, fh, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"CNI configuration directory {conf_dir!r}: cannot write {path!r}: {exc.strerror}") from None
    return path


def main() -> NoReturn:
    """The CNI protocol; or `install CONF_DIR [SETTINGS_JSON]`, the DaemonSet's init step."""
    if sys.argv[1:2] == ["install"] and len(sys.argv) in (3, 4):
        try:
            own = install_settings(sys.argv[3]) if len(sys.argv) == 4 else {}
            path = install_conflist(sys.argv[2], {"type": "interceptd-cni", "interceptd": own})
        except ConfigError as exc:
            print(f"interceptd-cni: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"interceptd-cni: chained into {path}", file=sys.stderr)
        sys.exit(0)
    # One byte over the limit is enough to refuse the request; a larger one is never read into memory.
    code, out = run(os.environ, sys.stdin.read(MAX_CONFIG_BYTES + 1) if not sys.stdin.isatty() else "")
    if out or code:
        print(json.dumps(out))
    exit_one_shot(code)


if __name__ == "__main__":
    main()
