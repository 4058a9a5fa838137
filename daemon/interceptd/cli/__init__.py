"""Layer 6, the edges users call: `interceptd`, `istio-iptables`, `interceptd-cni`. Each turns an
InterceptdError into one line and an exit code.
"""
