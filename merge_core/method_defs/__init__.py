"""Merge methods, one registry entry each (see merge_core/registry.py and docs/adding-a-method.md).

Every module here is imported by `registry` and calls `register(Method(...))`.
"""
