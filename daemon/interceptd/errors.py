"""One exception type per failure kind; the CLI edge maps each to a message and an exit code."""


class InterceptdError(Exception):
    """Base of every error interceptd reports to a user."""

    exit_code = 1


class ConfigError(InterceptdError):
    """A flag, environment variable or TOML key has a bad value. Nothing was touched."""

    exit_code = 2


class HostError(InterceptdError):
    """A fact about the host (addresses, resolv.conf, users) could not be read."""


class BindingMissingError(InterceptdError):
    """The libnftables Python binding (Debian's python3-nftables) is not importable."""


class KernelSideError(InterceptdError):
    """Base of every failure on the kernel's side of one network namespace: a refused transaction or listing,
    refused routes, a namespace that went, missing permission, descriptors run out.

    A table controller turns any of them into "not ready, retry with backoff" for its own table only: one pod's
    trouble never ends the process that keeps every other pod's rules.
    """


class RoutingError(KernelSideError):
    """An `ip rule`, route or lo address (TPROXY routing, ::6) could not be changed over netlink."""


class PreflightError(InterceptdError):
    """The host lacks something interceptd needs (libnftables, a kernel feature); nothing was changed."""


class NamespaceError(KernelSideError):
    """A network namespace file is missing, is not a network namespace, or cannot be entered."""


class KernelRefusedError(KernelSideError):
    """libnftables refused a transaction; the kernel kept the previous ruleset."""


class ReadBackError(KernelSideError):
    """The table read back right after an apply does not decide as the rendered ruleset (another process
    changed it in between): it is not taken as installed."""


class PermissionDeniedError(KernelSideError):
    """The process lacks CAP_NET_ADMIN: libnftables would print its own two lines and fail every call."""


class ResourceError(KernelSideError):
    """A process resource ran out (descriptors): the operation was not attempted, nothing was changed."""


class StateDirError(InterceptdError):
    """The state directory is not a private directory of ours (others could plant files in it)."""


class LockedError(InterceptdError):
    """Another interceptd instance holds the lock for this table."""


class UnexplainableError(InterceptdError):
    """The installed table holds something `explain` cannot evaluate (not written by this interceptd)."""


class NotInstalledError(InterceptdError):
    """A command needs interceptd's table in this namespace and it is not there."""

    exit_code = 3


class TraceError(InterceptdError):
    """`explain --kernel` could not take the kernel's trace of its probe connection."""


class ValidationFailedError(InterceptdError):
    """The redirect self-test (--run-validation) failed."""

    exit_code = 126


class ListenError(InterceptdError):
    """The metrics listener could not bind its address (in use, not local, no permission)."""
