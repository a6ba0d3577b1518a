"""minicloud: a small cloud for your own bare metal."""

__version__ = "0.1.0"
