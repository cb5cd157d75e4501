"""Cluster mode (protocol section 10): several gateways on one shared state.

``shared`` is the interface to the shared state; the rest of the package is
built on it. Without a ``[cluster]`` section nothing here is imported.
"""
