"""Layer 3, the system ports and their real adapters: libnftables (kernel), netlink routes (routes, rtnl),
kernel events, network namespaces, host facts, nftrace; and in-memory fakes of the ports (fake).

Everything here does I/O on behalf of one network namespace and knows nothing of agents or loops.
"""
