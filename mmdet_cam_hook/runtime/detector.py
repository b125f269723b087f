"""The detector on a batch of images without gradients: one forward pass through the test
pipeline, the data preprocessor, the adapter's features and head, in eval mode
(:func:`~mmdet_cam_hook.runtime.state.read_only`). The engine, D-RISE, the faithfulness
protocols and the hook's probes all run the detector through here.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .pipeline import preprocess_batch
from .state import read_only

__all__ = ['BatchedDetector', 'image_outputs', 'model_score_thr']


def image_outputs(outs, i: int):
    """Image ``i`` of batched head outputs, as a batch of one: every tensor in the (nested)
    tuples and lists sliced to ``[i:i + 1]``, so that an adapter (which reads image 0) reads
    image ``i``."""
    if isinstance(outs, torch.Tensor):
        return outs[i:i + 1]
    if isinstance(outs, tuple) and hasattr(outs, '_fields'):  # a NamedTuple (RoIOutputs)
        return type(outs)(*(image_outputs(o, i) for o in outs))
    if isinstance(outs, (tuple, list)):
        return type(outs)(image_outputs(o, i) for o in outs)
    return outs


def model_score_thr(adapter) -> float:
    """The head's own pre-NMS score filter (``test_cfg.score_thr``, 0 if unset): the detections
    ``model.predict`` would report, used for masked and perturbed images."""
    cfg = getattr(adapter.head, 'test_cfg', None) or {}
    return float(cfg.get('score_thr', 0.0))


class BatchedDetector:
    """A detector run on batches of images of one size, through its test pipeline and data
    preprocessor, one forward pass per batch, without gradients, in eval mode (every module's
    ``training`` flag restored after).

    Args:
        model (nn.Module): The unwrapped detector.
        adapter (DetectorAdapter): Its adapter.
        pipeline (Callable): The built test pipeline (reading arrays).
    """

    def __init__(self, model, adapter, pipeline) -> None:
        self.model, self.adapter, self.pipeline = model, adapter, pipeline

    def outputs(self, images: Sequence[np.ndarray]) -> Tuple[tuple, List[dict]]:
        """Head outputs of a batch (all images the same size) and each image's metainfo.

        Args:
            images (Sequence[np.ndarray]): (H, W, 3) uint8 BGR images of one size.

        Returns:
            tuple[tuple, list[dict]]: The head's batched outputs (read one image with
            :func:`image_outputs`) and the metainfo of each image.
        """
        with read_only(self.model), torch.no_grad():
            inputs, metas = preprocess_batch(self.model, self.pipeline,
                                             [np.ascontiguousarray(img) for img in images])
            outs = self.adapter.head_outputs(self.adapter.features(inputs), metas)
        return outs, metas

    def detect(self, images: Sequence[np.ndarray],
               score_thr: float) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decoded detections of each image (a :data:`DetectFn`), boxes in its pixels."""
        outs, metas = self.outputs(images)
        out = []
        with torch.no_grad():
            for i, meta in enumerate(metas):
                dets = self.adapter.decode(image_outputs(outs, i), meta, score_thr)
                out.append((dets.bboxes.detach().cpu().numpy(), dets.labels.cpu().numpy(),
                            dets.scores.detach().cpu().numpy()))
        return out
