"""The chain route's packed VJPs (mmdet_cam_hook/packing.py): the regions from NaN probes, the
grouping, and maps equal to one VJP per detection and to grad-cam's class."""
import warnings

import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam import packing
from mmdet_cam_hook.cam.packing import Reach, pack
from mmdet_cam_hook.testing import build_detector, build_yolox, synthetic_image


def test_pack_groups_boxes_that_do_not_meet():
    boxes = [[(0, 2, 0, 2)], [(3, 5, 3, 5)], [(2, 4, 2, 4)], [(6, 8, 0, 2)], [(0, -1, 0, -1)]]
    # 2 meets both 0 and 1; an empty box (y1 < y0) meets nothing
    assert pack(boxes) == [[0, 1, 3, 4], [2]]
    # two layers: members conflict if they meet on either
    assert pack([[(0, 1, 0, 1), (0, 1, 0, 1)], [(5, 6, 5, 6), (1, 2, 1, 2)]]) == [[0], [1]]


def test_reach_box_is_clipped_and_has_a_margin():
    reach = Reach(ratio=(2.0, 2.0), low=(-3, -3), high=(4, 4))
    # level rows 10..14 depend on T rows p with 2p - 3 <= 14 and 2p + 4 >= 10: p in 3..8
    y0, y1, x0, x1 = reach.box(10, 14, 0, 4, (20, 20))
    assert (y0, y1) == (3 - packing.MARGIN, 8 + packing.MARGIN)
    assert x0 == 0 and x1 == 3 + packing.MARGIN


def _spread_engine(model, layer, topk, pack_chain=True):
    engine = CAMEngine(model, target_layers=[layer], score_thr=0.0, topk=topk)
    engine.pack_chain = pack_chain
    return engine


@pytest.fixture(scope='module')
def nano():
    return build_yolox('nano', input_size=320, num_classes=80)


def test_packed_equals_one_vjp_per_detection(nano, monkeypatch):
    """YOLOX-nano at 320 (stage4: 10x10): several detections per VJP, the same maps as one VJP
    per detection, for every method that reads gradients."""
    image = synthetic_image(240, 320, seed=3)
    sizes = []
    original = packing.pack

    def spy(boxes):
        groups = original(boxes)
        sizes.extend(len(g) for g in groups)
        return groups

    monkeypatch.setattr(packing, 'pack', spy)
    methods = ['gradcam', 'gradcam++', 'xgradcam', 'layercam', 'hirescam', 'eigengradcam']
    packed = _spread_engine(nano, 'backbone.stage4', 24).explain(image, methods)
    assert max(sizes) > 1 and len(sizes) < 24  # packing happened
    single = _spread_engine(nano, 'backbone.stage4', 24, pack_chain=False).explain(image,
                                                                                  methods)
    for m in methods:
        np.testing.assert_allclose(packed[m].input_cams, single[m].input_cams, atol=1e-5,
                                   err_msg=m)


def test_a_region_too_small_is_caught(nano):
    """Regions shrunk on purpose: the check sees gradient outside the packed boxes, warns, and
    the maps are still those of one VJP per detection."""
    image = synthetic_image(240, 320, seed=3)
    engine = _spread_engine(nano, 'backbone.stage4', 24)
    engine.explain(image)  # probes the regions
    engine._reach['backbone.stage4'] = {
        level: None if r is None else Reach(r.ratio, (0, 0), (0, 0))
        for level, r in engine._reach['backbone.stage4'].items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = engine.explain(image)['gradcam']
    assert any('reach beyond the regions' in str(w.message) for w in caught)
    want = _spread_engine(nano, 'backbone.stage4', 24, pack_chain=False).explain(image)
    np.testing.assert_allclose(got.input_cams, want['gradcam'].input_cams, atol=1e-5)


def test_global_reach_is_not_packed():
    """RTMDet's CSPNeXt blocks have channel attention (a global average pool): a NaN anywhere
    in stage3's output reaches every position of every level, so nothing is packed."""
    model = build_detector('rtmdet/rtmdet_tiny_8xb32-300e_coco.py', 320, num_classes=3)
    engine = CAMEngine(model, target_layers=['backbone.stage3'], score_thr=0.0, topk=4)
    reach = packing.probe_reach(engine.adapter.features, engine.layers[0].module,
                                (1, 3, 320, 320), torch.device('cpu'))
    assert len(reach) == 3 and all(r is None for r in reach.values())
    # YOLOX's CSP neck has no global operation: stage4 reaches a bounded window of every level
    yolox = build_yolox('nano', input_size=320, num_classes=3)
    reach = packing.probe_reach(CAMEngine(yolox).adapter.features,
                                yolox.backbone.stage4, (1, 3, 320, 320), torch.device('cpu'))
    assert reach[0] is not None and reach[0].ratio == (4.0, 4.0)


def test_probe_reach_on_a_toy_network():
    """A 3x3 conv after a 2x nearest upsampling: T position p reaches level rows 2p - 1 .. 2p + 2
    (the conv's radius 1 around the two upsampled rows)."""
    up = torch.nn.Upsample(scale_factor=2)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    t_layer = torch.nn.Identity()

    def features(x):
        return (conv(up(t_layer(x[:, :1, ::4, ::4]))), )

    reach = packing.probe_reach(features, t_layer, (1, 3, 64, 64), torch.device('cpu'))
    assert reach[0] == Reach((2.0, 2.0), (-1, -1), (2, 2))


def test_first_last_rows():
    from mmdet_cam_hook.cam.routes import _first_last

    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert _first_last(mask).tolist() == [[1, 4], [0, -1], [0, 0]]
