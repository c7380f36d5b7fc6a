"""cbd-ray: Chain-based Distillation on Ray."""

__version__ = "0.1.0"
