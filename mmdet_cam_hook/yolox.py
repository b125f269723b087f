"""YOLOX specifics: preprocessing, decoding with the prior behind each box, per-detection scores.

The score of detection k is ``sigmoid(cls[label_k]) * sigmoid(obj)`` at the exact prior
(level, y, x) that produced the kept box. The prior index is carried through NMS as an extra
``InstanceData`` field (no IoU matching, no training loss).
"""
import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.transforms import Compose
from mmengine.config import Config, ConfigDict
from mmengine.structures import InstanceData
from torch import nn


def test_pipeline_cfg(cfg: Config) -> list:
    """A deep copy of the config's test pipeline (``test_dataloader``, else ``val_dataloader``,
    else ``test_pipeline``), reading arrays (``LoadImageFromNDArray``) and without annotations."""
    pipeline = None
    for key in ('test_dataloader', 'val_dataloader'):
        dataset = (cfg.get(key) or {}).get('dataset')
        while dataset is not None and pipeline is None:
            if 'pipeline' in dataset:
                pipeline = dataset['pipeline']
            else:
                dataset = dataset.get('dataset') or (dataset.get('datasets') or [None])[0]
        if pipeline is not None:
            break
    if pipeline is None:
        pipeline = cfg.get('test_pipeline')
    if not pipeline:
        raise ValueError('the model config has no test pipeline (looked in '
                         '`test_dataloader.dataset.pipeline`, `val_dataloader.dataset.pipeline` '
                         'and `test_pipeline`)')
    pipeline = [copy.deepcopy(dict(t)) for t in pipeline]
    pipeline = [t for t in pipeline if 'LoadAnnotations' not in str(t.get('type'))]
    pipeline[0] = dict(type='mmdet.LoadImageFromNDArray')
    return pipeline


def build_pipeline(pipeline_cfg: Sequence[dict]) -> Compose:
    """Build transforms from mmdet's registry, whatever the current default scope."""
    from mmdet.registry import TRANSFORMS

    return Compose([TRANSFORMS.build(ConfigDict(t)) if isinstance(t, dict) else t
                    for t in pipeline_cfg])


def preprocess(model: nn.Module, pipeline: Compose, image: np.ndarray) -> Tuple[torch.Tensor, dict]:
    """Run an HxWx3 BGR uint8 image through the test pipeline and the model's data preprocessor.

    Returns:
        tuple[torch.Tensor, dict]: (1, 3, H_in, W_in) float input and the sample's metainfo.
    """
    data = pipeline(dict(img=image, img_id=0))
    batch = model.data_preprocessor(
        dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    return batch['inputs'], batch['data_samples'][0].metainfo


@dataclass
class Detections:
    """Kept detections with the prior behind each box (K = number of detections)."""

    bboxes: torch.Tensor  # (K, 4) original-image pixels
    scores: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,)
    levels: torch.Tensor  # (K,)
    ys: torch.Tensor  # (K,) row on the level's grid
    xs: torch.Tensor  # (K,) column on the level's grid

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, idx) -> 'Detections':
        return Detections(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def decode(head: nn.Module, outs: Tuple[List[torch.Tensor], ...], metainfo: dict,
           score_thr: float) -> Detections:
    """``YOLOXHead.predict_by_feat`` for one image, carrying each box's prior index through NMS.

    The pre-NMS filter uses ``min(test_cfg.score_thr, score_thr)`` so that a threshold lower than
    the config's still yields detections; above it the result equals ``model.predict``'s.
    """
    cls_scores, bbox_preds, objectnesses = (tuple(t.detach() for t in o) for o in outs)
    cfg = copy.deepcopy(head.test_cfg)
    pre_thr = min(float(cfg.get('score_thr', 0.0)), float(score_thr))
    sizes = [c.shape[2:] for c in cls_scores]
    priors = torch.cat(head.prior_generator.grid_priors(
        sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device, with_stride=True))
    cls = torch.cat([c[0].permute(1, 2, 0).reshape(-1, c.shape[1]) for c in cls_scores]).sigmoid()
    reg = torch.cat([b[0].permute(1, 2, 0).reshape(-1, 4) for b in bbox_preds])
    obj = torch.cat([o[0].permute(1, 2, 0).reshape(-1) for o in objectnesses]).sigmoid()
    bboxes = head._bbox_decode(priors, reg[None])[0]
    max_scores, labels = cls.max(1)
    valid = obj * max_scores >= pre_thr
    results = InstanceData(bboxes=bboxes[valid], scores=(max_scores * obj)[valid],
                           labels=labels[valid], prior_idx=valid.nonzero()[:, 0])
    results = head._bbox_post_process(results, cfg, rescale=True, with_nms=True,
                                      img_meta=metainfo)
    keep = results.scores >= score_thr
    results = results[keep]
    order = results.scores.argsort(descending=True, stable=True)
    results = results[order]

    offsets = torch.tensor([0] + [int(h * w) for h, w in sizes], device=results.prior_idx.device)
    starts = offsets.cumsum(0)
    levels = torch.bucketize(results.prior_idx, starts[1:], right=True)
    local = results.prior_idx - starts[levels]
    widths = torch.tensor([int(w) for _, w in sizes], device=local.device)[levels]
    return Detections(results.bboxes, results.scores, results.labels, levels,
                      local // widths, local % widths)


def detection_scores(outs: Tuple[List[torch.Tensor], ...], dets: Detections) -> List[torch.Tensor]:
    """The differentiable score of each detection on the live head outputs."""
    cls_scores, _, objectnesses = outs
    return [cls_scores[l][0, c, y, x].sigmoid() * objectnesses[l][0, 0, y, x].sigmoid()
            for l, c, y, x in zip(dets.levels.tolist(), dets.labels.tolist(), dets.ys.tolist(),
                                  dets.xs.tolist())]


class LocalHeadGradient:
    """Gradients of detection scores with respect to the neck output of their own level.

    A YOLOX score at level l reads ``neck.out_convs[l]`` through ``stacked_convs`` 3x3 convolutions
    and 1x1 predictors, so it depends on a (2r+1) x (2r+1) window of that map (r = number of 3x3
    convs, 2 in every YOLOX). The window is cut out (zero outside the map, as the convs pad), the
    level's head is run on it with the padding positions zeroed after each block (as the next
    block's zero padding sees them), and one ``autograd.grad`` gives every detection's gradient.
    This equals the full backward exactly, at the cost of a few tiny convolutions.
    """

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.radius = self._radius(head)

    @staticmethod
    def _radius(head: nn.Module) -> Optional[int]:
        """Receptive radius of one level's stacked convs, or None if the head's structure is not
        the one this shortcut is exact for (then the engine uses full backward passes)."""
        names = ('multi_level_cls_convs', 'multi_level_reg_convs', 'multi_level_conv_cls',
                 'multi_level_conv_obj')
        if not all(isinstance(getattr(head, n, None), nn.ModuleList) for n in names):
            return None
        radii = set()
        for branch in (*head.multi_level_cls_convs, *head.multi_level_reg_convs):
            if not isinstance(branch, nn.Sequential):
                return None
            radius = 0
            for block in branch:
                for conv in block.modules():
                    if isinstance(conv, nn.modules.conv._ConvNd):
                        k, d = conv.kernel_size[0], conv.dilation[0]
                        if (k != conv.kernel_size[-1] or set(conv.stride) != {1}
                                or conv.padding != tuple((k - 1) // 2 * dd
                                                         for dd in conv.dilation)
                                or conv.padding_mode != 'zeros'):
                            return None
                        radius += (k - 1) // 2 * d
            radii.add(radius)
        for conv in (*head.multi_level_conv_cls, *head.multi_level_conv_obj):
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
                return None
        return radii.pop() if len(radii) == 1 else None

    @property
    def available(self) -> bool:
        return self.radius is not None

    def __call__(self, feat: torch.Tensor, level: int, dets: Detections) -> torch.Tensor:
        """Gradients of ``dets``' scores (all on ``level``) w.r.t. ``feat`` (1, C, h, w).

        Returns:
            torch.Tensor: (K, C, h, w), zero outside each detection's window.
        """
        r, head = self.radius, self.head
        _, c, h, w = feat.shape
        size = 2 * r + 1
        ys, xs = dets.ys.tolist(), dets.xs.tolist()
        padded = F.pad(feat.detach(), (r, r, r, r))
        patches = torch.stack([padded[0, :, y:y + size, x:x + size] for y, x in zip(ys, xs)])
        patches.requires_grad_(True)
        inside = torch.ones((1, 1, h, w), dtype=feat.dtype, device=feat.device)
        inside = F.pad(inside, (r, r, r, r))
        mask = torch.stack([inside[0, :, y:y + size, x:x + size] for y, x in zip(ys, xs)])

        def branch(blocks: nn.Sequential) -> torch.Tensor:
            out = patches
            for block in blocks:
                out = block(out) * mask
            return out[:, :, r:r + 1, r:r + 1]

        with torch.enable_grad():
            cls = head.multi_level_conv_cls[level](branch(head.multi_level_cls_convs[level]))
            obj = head.multi_level_conv_obj[level](branch(head.multi_level_reg_convs[level]))
            idx = torch.arange(len(dets), device=feat.device)
            scores = cls[idx, dets.labels, 0, 0].sigmoid() * obj[:, 0, 0, 0].sigmoid()
            (grad, ) = torch.autograd.grad(scores.sum(), patches)
        full = F.pad(torch.zeros((len(dets), c, h, w), dtype=feat.dtype, device=feat.device),
                     (r, r, r, r))
        for k, (y, x) in enumerate(zip(ys, xs)):
            full[k, :, y:y + size, x:x + size] = grad[k]
        return full[:, :, r:r + h, r:r + w]
