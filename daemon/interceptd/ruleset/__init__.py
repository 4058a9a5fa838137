"""Layer 2, the ruleset, pure: Config + HostFacts -> Ruleset (model) -> nftables JSON (nftjson), and back
(nftparse); drift between listings; `explain` evaluates a connection on the model. No I/O, no root.
"""
