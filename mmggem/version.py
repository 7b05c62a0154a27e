"""mmggem's version (the package's own modules read it here, not from ``mmggem``)."""

__version__ = "0.1.0"
