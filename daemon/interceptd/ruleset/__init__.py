"""Layer 2, the ruleset, pure: Config + HostFacts -> Ruleset (model, every name from `names`) -> nftables JSON
(nftjson) or nft text (nfttext), and back from a listing (nftparse); drift between listings; `explain`
evaluates a connection on the model. No I/O, no root.
"""
