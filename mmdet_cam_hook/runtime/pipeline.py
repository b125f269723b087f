"""The model's own test pipeline, generic over detectors: config lookup, build, preprocess.

An image goes through the config's test pipeline (``LoadImageFromNDArray`` instead of the file
loader, no annotations) and the model's data preprocessor, exactly as ``model.predict`` sees
it. The metainfo it returns is what :class:`~mmdet_cam_hook.cam.geometry.Letterbox` undoes.

A tracking config's video pipeline (``TransformBroadcaster`` around the per-frame transforms,
then ``PackTrackInputs``) becomes its per-frame image pipeline (the broadcaster's transforms,
then ``PackDetInputs``), and a ``TrackDataPreprocessor`` gets each image as a one-frame video,
so that the detector's input is the frame exactly as the tracker feeds it to the detector.
"""
import copy
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch
from mmcv.transforms import Compose
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope
from torch import nn


def test_pipeline_cfg(cfg: Config) -> list:
    """A deep copy of the config's test pipeline (``test_dataloader``, else ``val_dataloader``,
    else ``test_pipeline``), reading arrays (``LoadImageFromNDArray``) and without annotations.

    Raises:
        ValueError: If the config has no test pipeline.
    """
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
    pipeline = per_frame_pipeline(pipeline)
    # LoadAnnotations, LoadPanopticAnnotations (the panoptic configs)
    pipeline = [t for t in pipeline if 'Annotations' not in str(t.get('type'))]
    pipeline[0] = dict(type='mmdet.LoadImageFromNDArray')
    return pipeline


def per_frame_pipeline(pipeline: List[dict]) -> List[dict]:
    """A tracking (video) pipeline as the pipeline of one frame: each ``TransformBroadcaster``
    replaced by its transforms (the broadcaster runs them on every frame alike) and
    ``PackTrackInputs`` by ``PackDetInputs`` (one frame's ``DetDataSample``); other pipelines
    are returned as they are."""
    frame = []
    for t in pipeline:
        kind = str(t.get('type')).split('.')[-1]
        if kind == 'TransformBroadcaster':
            frame += [dict(u) for u in t['transforms']]
        elif kind == 'PackTrackInputs':
            frame.append(dict(type='mmdet.PackDetInputs'))
        else:
            frame.append(t)
    return frame


def build_pipeline(pipeline_cfg: Sequence[dict], scope: str = 'mmdet') -> Compose:
    """Build transforms from mmdet's registry in the model's scope, whatever the current default
    scope (a ``Runner`` or a script of another OpenMMLab library may have set one, e.g.
    ``mmengine``, whose registry has no ``PackDetInputs``); the current scope is restored after.

    Args:
        pipeline_cfg (Sequence[dict]): Transform configs (or built transforms, kept as they are).
        scope (str): The default scope to build in: the model config's ``default_scope``.
            Defaults to 'mmdet'.

    Returns:
        mmcv.transforms.Compose: The pipeline.
    """
    from mmdet.registry import TRANSFORMS

    with DefaultScope.overwrite_default_scope(scope):
        return Compose([TRANSFORMS.build(ConfigDict(t)) if isinstance(t, dict) else t
                        for t in pipeline_cfg])


def preprocess_batch(model: nn.Module, pipeline: Compose,
                     images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, List[dict]]:
    """Run HxWx3 BGR uint8 images through the test pipeline one by one and through the model's
    data preprocessor as one batch (``training=False``: no batch augmentation, no collective),
    padded as a batched ``model.predict`` pads them.

    Returns:
        tuple[torch.Tensor, list[dict]]: (N, 3, H_in, W_in) float input and each sample's
        metainfo.

    Raises:
        ValueError: If the pipeline cannot resize an image (one side would shrink to 0 pixels,
            e.g. 4000x2); the message names its size, and its index when there are several.
    """
    data = []
    for i, image in enumerate(images):
        try:
            data.append(pipeline(dict(img=image, img_id=0)))
        except cv2.error as exc:
            h, w = image.shape[:2]
            where = f'image {i} of the batch: ' if len(images) > 1 else ''
            raise ValueError(
                f'{where}the test pipeline could not resize the {w}x{h} (width x height) image '
                'to the network input: one side would shrink to 0 pixels. Crop or pad the image '
                'to a less extreme aspect ratio') from exc
    inputs, samples = [d['inputs'] for d in data], [d['data_samples'] for d in data]
    if _is_track_preprocessor(model.data_preprocessor):
        # (T=1, 3, H, W) frames of one-frame videos, normalised and padded per frame as the
        # tracker's own batches are; its (N, 1, 3, H, W) input's frame 0 is what the detector sees
        from mmdet.structures import TrackDataSample

        batch = model.data_preprocessor(
            dict(inputs=[x[None] for x in inputs],
                 data_samples=[TrackDataSample(video_data_samples=[s]) for s in samples]), False)
        return batch['inputs'][:, 0], [video[0].metainfo for video in batch['data_samples']]
    batch = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), False)
    return batch['inputs'], [sample.metainfo for sample in batch['data_samples']]


def _is_track_preprocessor(preprocessor: nn.Module) -> bool:
    from mmdet.models.data_preprocessors import TrackDataPreprocessor

    return isinstance(preprocessor, TrackDataPreprocessor)


def preprocess(model: nn.Module, pipeline: Compose, image: np.ndarray) -> Tuple[torch.Tensor, dict]:
    """:func:`preprocess_batch` for one image.

    Returns:
        tuple[torch.Tensor, dict]: (1, 3, H_in, W_in) float input and the sample's metainfo.
    """
    inputs, metas = preprocess_batch(model, pipeline, [image])
    return inputs, metas[0]
