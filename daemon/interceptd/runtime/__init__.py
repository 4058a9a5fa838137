"""Layer 5, the long-running processes: one event loop, the agent (`run`), the node agent (`node`), metrics
and health endpoints, sd_notify, the lock file and logging.
"""
