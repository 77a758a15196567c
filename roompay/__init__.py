"""roompay: pay-per-use platform for in-room hotel appliances."""

__version__ = "0.1.0"
