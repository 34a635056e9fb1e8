"""Thin trio adapters: listeners, the per-connection socket loop, TLS wrapping."""
