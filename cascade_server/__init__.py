"""cascade-server: a distilled student answers easy requests, a Triton-hosted teacher the hard ones."""

__version__ = "0.1.0"
