"""Layer 4, control: install a ruleset in one namespace (install), decide drift (reconcile), and the
per-table controller that applies, checks, repairs, reloads and backs off, with no loop of its own.
"""
