"""interceptd: istio-iptables compatible traffic interception on nftables, kept in place."""

__version__ = "0.1.0"
