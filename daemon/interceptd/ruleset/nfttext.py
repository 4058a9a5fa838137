"""Pure printing of a Ruleset as nftables text: what `interceptd render --format nft` shows.

Why text at all, when the kernel is fed JSON: people review rules as text, Istio's own golden files are
text, and a diff of two renders should read like `nft list table`. The text is a complete `nft -f` input for
the same table (the integration tests load it and compare the kernel's listing with the JSON apply's), so it
is also a way to install interceptd's rules by hand. Each rule is preceded by a comment with its meaning, and
the state interceptd keeps outside the table (TPROXY's policy routes, the ::6 address) is written as comments
at the top: `nft` ignores them, a reader needs them.

The order is the model's, which is deterministic: sets by name, then one named counter per rule, then the
chains in evaluation order with their rules in order.
"""

from __future__ import annotations

from interceptd.config.values import Prefix
from interceptd.ruleset import model as m
from interceptd.ruleset.names import BASE_CHAIN_POLICY, counter_name

INDENT = "\t"


def scalar_text(value: m.Scalar) -> str:
    """One value as nft writes it: host prefixes as plain addresses, port ranges as first-last."""
    return value.nft_text() if isinstance(value, Prefix) else str(value)


def _string_text(value: m.Scalar, quoted: bool) -> str:
    return f'"{value}"' if quoted else scalar_text(value)


def match_text(match: m.Match) -> str:
    """`iifname "lo"`, `meta skuid != @proxy-uids`, `tcp dport != { 53, 15008 }`, `ct state established,related`."""
    key = match.key
    quoted = key in ("iifname", "oifname")  # interface names are strings even when they look like words
    left = f"meta {key}" if key in m.META_KEYS and not quoted else key
    value = match.value
    if isinstance(value, m.SetRef):
        right = f"@{value.name}"
    elif isinstance(value, tuple):
        if key == "ct state":
            right = ",".join(str(v) for v in value)  # a bit mask: any of the states
        else:
            right = "{ " + ", ".join(_string_text(v, quoted) for v in value) + " }"
    else:
        right = _string_text(value, quoted)
    if match.mask is not None:  # marks under a mask read best in hex, as Istio writes them
        return f"{left} & {match.mask:#x} {'!=' if match.negate else '=='} {value:#x}"
    return f"{left} {'!= ' if match.negate else ''}{right}"


def action_text(action: m.Action) -> str:
    match action:
        case m.Jump(chain):
            return f"jump {chain}"
        case m.Return():
            return "return"
        case m.Accept():
            return "accept"
        case m.Drop():
            return "drop"
        case m.Redirect(port):
            return f"redirect to :{port}"
        case m.TProxy(family, port):
            return f"tproxy {family} to :{port}"
        case m.Snat(family, address):
            return f"snat {family} to {address}"
        case m.SetMark(value):
            return f"meta mark set {value}"
        case m.MarkFromCtMark():
            return "meta mark set ct mark"
        case m.CtMarkFromMark():
            return "ct mark set meta mark"
        case m.SetCtZone(zone):
            return f"ct zone set {zone}"
        case m.SetCtMarkBits(bits, mask):
            return f"ct mark set ct mark & {m.MARK_BITS & ~mask:#010x} | {bits:#x}"
    raise TypeError(action)


def rule_text(chain: m.Chain, rule: m.Rule) -> str:
    """One rule line: its matches, its named counter, its statements, its name as the comment."""
    words = [match_text(test) for test in rule.matches]
    words.append(f'counter name "{counter_name(chain.name, rule.name)}"')
    words += [action_text(a) for a in rule.actions]
    words.append(f'comment "{rule.name}"')
    return " ".join(words)


def set_lines(nset: m.NamedSet) -> list[str]:
    quoted = nset.type == "ifname"
    lines = [f"set {nset.name} {{", f"{INDENT}type {nset.type}"]
    if nset.interval:
        lines.append(f"{INDENT}flags interval")
    if nset.elements:
        lines.append(f"{INDENT}elements = {{ " + ", ".join(_string_text(e, quoted) for e in nset.elements) + " }")
    return [*lines, "}"]


def chain_lines(chain: m.Chain) -> list[str]:
    lines = [f"chain {chain.name} {{"]
    if chain.hook is not None:
        lines.append(f"{INDENT}type {chain.hook.type} hook {chain.hook.hook} priority {chain.hook.priority}; "
                     f"policy {BASE_CHAIN_POLICY};")
    for rule in chain.rules:
        if rule.why:
            lines.append(f"{INDENT}# {rule.why}")
        lines.append(INDENT + rule_text(chain, rule))
    return [*lines, "}"]


def route_comments(ruleset: m.Ruleset) -> list[str]:
    """The kernel state interceptd keeps next to the table, as the `ip` commands that would make it."""
    lines = []
    for route in sorted(ruleset.routes):
        lines += _route_lines(route)
    lines += [f"# ip -6 address add {address}/128 dev lo (the proxy's IPv6 passthrough source)"
              for address in ruleset.lo_addresses]
    if lines:
        lines.insert(0, "# Outside the table, interceptd also keeps:")
    return lines


def _route_lines(route: m.PolicyRoute) -> list[str]:
    default = "0.0.0.0/0" if route.family == 4 else "::/0"
    mask = "" if route.mask == m.MARK_BITS else f"/{route.mask:#x}"
    return [f"# ip -{route.family} rule add fwmark {route.mark}{mask} lookup {route.table}",
            f"# ip -{route.family} route add local {default} dev lo table {route.table}"]


def ruleset_text(ruleset: m.Ruleset) -> str:
    """The whole table as one `nft -f` document, ending with a newline."""
    blocks = [set_lines(nset) for nset in ruleset.sets]
    blocks.append([f"counter {name} {{ }}" for name in ruleset.counter_names()])
    blocks += [chain_lines(chain) for chain in ruleset.chains]
    lines = [*route_comments(ruleset), f"table {ruleset.family} {ruleset.table} {{"]
    for n, block in enumerate(blocks):
        lines += ([""] if n else []) + [INDENT + line for line in block]
    lines.append("}")
    return "\n".join(lines) + "\n"
