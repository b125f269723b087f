"""Helpers for tests and benchmarks, one job a module, all re-exported here (``testing.X``).
Not imported by the package itself.

- :mod:`.models`: randomly initialised detectors from mmdet's own configs (no weights can be
  downloaded here), their heads perturbed deterministically so that scores do not tie and
  boxes are not degenerate.
- :mod:`.images`: synthetic images.
- :mod:`.forward`: one image through an engine's adapter and through ``model.predict``.
- :mod:`.runs`: tiny MMEngine runs for the hook tests and what they leave.
- :mod:`.files`: the config and checkpoint the CLI tests write.
- :mod:`.memory`, :mod:`.torchrun`: peak memory of a call; a torchrun job beside this process.
- :mod:`.reference` (grad-cam once per detection, the oracle), :mod:`.text` (a tiny BERT and
  the text-prompted detectors), :mod:`.browser` (Chromium): imported by name.
"""
from .files import YOLOX_NANO_128, confident_yolox_128
from .forward import Decoded, decoded, kept_pairs, live_outputs, own_test_cfg, predicted
from .images import squares_image, synthetic_image
from .memory import peak_memory
from .models import (
    SIZES,
    _drop_pretrained,
    _quiet_init_weights,
    _set_num_classes,
    build_detector,
    build_model,
    build_yolox,
    calibrate_bn,
    detector_config,
    mmdet_config,
    offline_config,
    perturb_head,
    raise_yolox_scores,
    yolox_config,
)
from .runs import (
    TINY_CONFIGS,
    TINY_FASTER_RCNN,
    TINY_METHODS,
    TINY_SIZE,
    cam_hook,
    coco_dataset,
    hooks_of,
    run_log_dir,
    run_log_text,
    tiny_cfg,
    tiny_shapes,
    unwrap_model,
)
from .torchrun import torchrun_beside

__all__ = [
    'SIZES', 'TINY_CONFIGS', 'TINY_FASTER_RCNN', 'TINY_METHODS', 'TINY_SIZE', 'YOLOX_NANO_128',
    'build_detector', 'build_model', 'build_yolox', 'calibrate_bn', 'cam_hook', 'coco_dataset',
    'confident_yolox_128', 'decoded', 'Decoded', 'detector_config', 'hooks_of', 'kept_pairs',
    'live_outputs', 'mmdet_config', 'offline_config', 'own_test_cfg', 'peak_memory',
    'perturb_head', 'predicted', 'raise_yolox_scores', 'run_log_dir', 'run_log_text',
    'squares_image', 'synthetic_image', 'tiny_cfg', 'tiny_shapes', 'torchrun_beside',
    'unwrap_model', 'yolox_config', '_drop_pretrained', '_quiet_init_weights', '_set_num_classes',
]
