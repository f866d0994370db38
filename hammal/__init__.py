"""hammal: a Twisted-based Docker/OCI registry pull-through mirror."""

__version__ = "0.1.0"
