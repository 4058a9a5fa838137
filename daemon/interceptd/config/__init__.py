"""Layer 1, configuration: every option (flag, environment variable, TOML key) parsed and checked into one
immutable Config. Imports nothing of interceptd but `errors`.

The option table lives in `options`, value parsers in `values`; the names below are the layer's API.
"""

from interceptd.config.options import OPTIONS, OPTIONS_BY_KEY, Config, Option, load, load_all, read_toml

__all__ = ["OPTIONS", "OPTIONS_BY_KEY", "Config", "Option", "load", "load_all", "read_toml"]
