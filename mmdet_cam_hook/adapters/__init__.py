"""One adapter per detector family (see :mod:`.base`); importing this package registers them."""
from . import fcos, gfl, retinanet, rtmdet, yolov3, yolox  # noqa: F401  (register the adapters)
from .base import (
    ADAPTERS,
    Detections,
    DetectorAdapter,
    build_adapter,
    locate_priors,
    supported_heads,
    trace_level_layers,
)

__all__ = [
    'ADAPTERS', 'DetectorAdapter', 'Detections', 'build_adapter', 'locate_priors',
    'supported_heads', 'trace_level_layers'
]
