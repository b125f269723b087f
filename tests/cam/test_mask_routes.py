"""The mask branches' two gradient routes (``MaskBranch.route``) agree, and the ``exact`` one
equals grad-cam where the ``level`` one cannot run.

A Mask R-CNN's mask target is computed from one level map (its RoI), so the ``level`` route's
RoI shortcut applies; running the same branch with ``route = 'exact'`` (the engine
backpropagates the mask target through the full graph of the one forward pass, as it must for
heads whose masks mix levels: RTMDet-Ins, SOLOv2, CondInst, Mask2Former) gives the same maps.
On a backbone layer (not a level map) only the exact route has maps, and they equal grad-cam's
class run once per instance with the mask target. Random-init ResNet-18 Mask R-CNN at 128 px,
one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters.masks import (
    MASK_BRANCHES,
    MaskBranch,
    RoIMaskBranch,
    register_mask_branch,
)
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_detector, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

METHODS = ('gradcam', 'hirescam', 'layercam')


class ExactRoIMaskBranch(RoIMaskBranch):
    """Mask R-CNN's branch on the engine's exact route (not registered)."""

    route = 'exact'


@pytest.fixture(scope='module')
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_detector(
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
        perturb=dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01,
                              'conv_logits': 0.3},
                     biases={'fc_cls': (0.0, 0.5), 'conv_logits': (0.0, 0.3)}),
        cfg_options={'model.backbone.depth': 18,
                     'model.neck.in_channels': [64, 128, 256, 512],
                     'model.test_cfg.rpn.max_per_img': 100,
                     'model.test_cfg.rcnn.max_per_img': 20,
                     'model.roi_head.mask_head.conv_out_channels': 32,
                     'model.roi_head.bbox_roi_extractor.finest_scale': 8,
                     'model.roi_head.mask_roi_extractor.finest_scale': 8})
    torch.set_num_threads(threads)


def _exact(engine: CAMEngine) -> CAMEngine:
    engine.mask_branch = ExactRoIMaskBranch(engine.adapter)
    return engine


def test_exact_route_equals_the_level_route(model):
    """Level-aware default layers (each instance's level on the level route, every level on
    the exact one: the other levels' gradients are zero) and all level maps at once."""
    image = synthetic_image(96, 160, seed=4)
    for layers in (None, ['neck.fpn_convs.0', 'neck.fpn_convs.1']):
        level = CAMEngine(model, score_thr=0.0, topk=10, target_layers=layers)
        exact = _exact(CAMEngine(model, score_thr=0.0, topk=10, target_layers=layers,
                                 chunk_size=4))
        want = level.explain(image, methods=METHODS)
        got = exact.explain(image, methods=METHODS)
        for method in METHODS:
            np.testing.assert_array_equal(got[method].masks, want[method].masks)
            np.testing.assert_allclose(got[method].mask_cams, want[method].mask_cams,
                                       atol=1e-5, err_msg=f'{method} {layers}')
            assert got[method].mask_cams.max() > 0


def test_exact_route_on_a_backbone_layer_equals_grad_cam(model):
    """``backbone.layer3`` feeds every level: the level route has no maps there (a warning
    says so), the exact route's equal grad-cam with the mask target, instance by instance."""
    image = synthetic_image(96, 160, seed=4)
    with pytest.warns(UserWarning, match='mask maps need level-map target layers'):
        res = CAMEngine(model, score_thr=0.0, topk=6, target_layers='backbone.layer3'
                        ).explain(image, methods='gradcam')['gradcam']
    assert res.mask_cams is None
    engine = _exact(CAMEngine(model, score_thr=0.0, topk=6, target_layers='backbone.layer3'))
    inputs, meta = preprocess(engine.model, engine.pipeline, image)
    with torch.no_grad():
        outs = engine.adapter.head_outputs(engine.adapter.features(inputs))
        dets = engine.adapter.decode(outs, meta, engine.score_thr).select(slice(0, 6))
    results = engine.explain(image, methods=METHODS)
    for method, res in results.items():
        try:
            ref = reference_input_cams(model, inputs, method, [['backbone.layer3']] * 6, dets,
                                       metainfo=meta, mask_branch=engine.mask_branch)
        finally:
            model.zero_grad(set_to_none=True)
        on_image = res.letterbox.to_original(torch.from_numpy(ref), image.shape[:2])
        np.testing.assert_allclose(res.mask_cams, on_image.clamp(0, 1).numpy(), atol=1e-4,
                                   err_msg=method)
        assert (res.mask_cams.reshape(6, -1).max(1) > 0).all(), method


def test_register_mask_branch_checks_what_it_registers():
    assert RoIMaskBranch in MASK_BRANCHES
    with pytest.raises(TypeError, match='MaskBranch subclass'):
        register_mask_branch(object)

    class Bad(MaskBranch):
        route = 'fast'

    with pytest.raises(ValueError, match=r"'fast'.*\['level', 'exact'\]"):
        register_mask_branch(Bad)
    assert Bad not in MASK_BRANCHES
