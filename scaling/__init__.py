"""scaling: scaling-law and isoFLOP studies of dense and Mixture-of-Experts transformers."""

__version__ = "0.1.0"
