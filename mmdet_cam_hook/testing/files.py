"""What the CLI tests write: a user's config of mmdet's YOLOX-nano at 128 px and a checkpoint
whose random model detects things."""
import torch

from ..runtime.model import init_model
from .models import raise_yolox_scores

#: A user's config: mmdet's YOLOX-nano for 3 classes, testing at 128 px without score filter.
YOLOX_NANO_128 = """
_base_ = 'mmdet::yolox/yolox_nano_8xb8-300e_coco.py'
img_scale = (128, 128)
model = dict(bbox_head=dict(num_classes=3), test_cfg=dict(score_thr=0.0))
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
"""


def confident_yolox_128(config_path) -> torch.nn.Module:
    """Write :data:`YOLOX_NANO_128` to ``config_path`` and return the random-init model the
    package builds from it (``init_model``), its scores raised
    (:func:`~.models.raise_yolox_scores`, seed 0) so that it scores priors at ~0.3-0.9."""
    config_path.write_text(YOLOX_NANO_128)
    model = init_model(str(config_path))
    raise_yolox_scores(model, 0)
    return model
