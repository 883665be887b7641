"""Decode-time KV compression and radix-cache eviction policies."""
