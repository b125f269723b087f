"""One adapter per detector family (see :mod:`.base`); importing this package registers them."""
from . import (  # noqa: F401  (register the adapters)
    detr,
    fcos,
    gfl,
    query,
    retinanet,
    roi_variants,
    rpn,
    rtmdet,
    two_stage,  # noqa: F401  (register the two-stage adapters)
    wrappers,
    yolov3,
    yolox,
)
from .base import (
    ADAPTERS,
    Detections,
    DetectorAdapter,
    build_adapter,
    locate_priors,
    supported_heads,
    trace_level_layers,
)
from .table import replace_table, supported_detectors, supported_table

__all__ = [
    'ADAPTERS', 'DetectorAdapter', 'Detections', 'build_adapter', 'locate_priors',
    'replace_table', 'supported_detectors', 'supported_heads', 'supported_table',
    'trace_level_layers'
]
