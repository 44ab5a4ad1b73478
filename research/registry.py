"""Re-export: `Registry` lives in kernels/registry.py (kernels/ imports nothing above it)."""
from kernels.registry import Registry  # noqa: F401
