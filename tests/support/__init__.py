"""Test labs shared by the suite, the benchmarks, the demo and the soak: network namespaces with real
traffic (netlab), the node agent and CNI (nodelab), the interception-gap prober (gaplab), fuzz strategies."""
