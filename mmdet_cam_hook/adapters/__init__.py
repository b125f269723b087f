"""One adapter per detector family (see :mod:`.base`); importing this package registers them."""
from .base import ADAPTERS, Detections, DetectorAdapter, build_adapter, supported_heads

__all__ = ['ADAPTERS', 'DetectorAdapter', 'Detections', 'build_adapter', 'supported_heads']
