"""cascade-server: a small student answers easy requests, a teacher on Triton the hard ones."""

__version__ = "0.1.0"
