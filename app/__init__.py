"""FrankenMoE Studio: build Mixture-of-Experts models from existing models."""

__version__ = "0.1.0"
