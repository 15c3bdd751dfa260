"""lmfleet: train, compress and serve language models from one laptop to a cluster."""

__version__ = "0.1.0"
