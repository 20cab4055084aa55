"""Command-line interface: `optimum-prune ...` and `optimum-cli prune ...` share the same arguments and code."""
