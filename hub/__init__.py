"""The hub server's parts; hub.py at the repository root is the entry point (uv run hub.py --data DIR)."""
