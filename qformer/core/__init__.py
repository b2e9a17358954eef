"""The bottom layer: paths, logging, seeding, the registry, progress bars, error types, signal handling.

Imports nothing else of qformer; every other package may import it.
"""
