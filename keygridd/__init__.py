"""KeyGrid: many key stores behind one PKCS#11 token interface."""

__version__ = "0.1.0"
