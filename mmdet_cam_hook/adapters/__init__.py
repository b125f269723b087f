"""One adapter per detector family (see :mod:`.base`); importing this package registers them."""
from . import (  # noqa: F401  (register the adapters)
    anchor_free,
    atss_family,
    detr,
    distillation,
    fcos,
    gfl,
    grounding,
    query,
    retina_variants,
    retinanet,
    roi_variants,
    rpn,
    rtmdet,
    rtmdet_ins,
    ssd,
    two_stage,  # noqa: F401  (register the two-stage adapters)
    wrappers,
    yolof,
    yolov3,
    yolox,
)
from .base import (
    ADAPTERS,
    Detections,
    DetectorAdapter,
    locate_priors,
    trace_level_layers,
)
from .support import HeadMatch, build_adapter, head_matches, supported_heads
from .table import replace_table, supported_detectors, supported_table

__all__ = [
    'ADAPTERS', 'DetectorAdapter', 'Detections', 'HeadMatch', 'build_adapter', 'head_matches',
    'locate_priors',
    'replace_table', 'supported_detectors', 'supported_heads', 'supported_table',
    'trace_level_layers'
]
