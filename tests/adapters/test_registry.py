"""Every head class mmdet 3.3 registers is either supported by the one rule or refused with the
clear error when the engine is built (never taken, then crashing inside ``explain``).

The rule (:mod:`mmdet_cam_hook.adapters.support`): a head class is supported only if it is
listed in an adapter's ``head_types``, or subclasses a listed class without overriding a method
of the adapter's ``relies_on``. "Supported" is derived from the registry here, so adapters added
later need no change to this file. The static tests build no model: a refused class is put,
uninitialised, where the adapter looks for its head, and :func:`build_adapter` must refuse it
before touching it. Two real builds (random-init, light) close the loop through ``CAMEngine``.
"""
import inspect
import re
from types import SimpleNamespace

import pytest
from torch import nn

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import ADAPTERS, build_adapter, head_matches
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
from mmdet_cam_hook.testing import build_detector

# The heads the issue found taken as supported, then crashing inside explain (issue 19).
CRASHED = ('PAAHead', 'TOODHead', 'VFNetHead', 'RTMDetInsSepBNHead', 'DoubleConvFCBBoxHead',
           'StageCascadeRPNHead', 'CascadeRPNHead', 'LADHead')
# Light configs of heads that subclass a supported class but change what it relies on; the
# real-build test takes the first one the rule refuses (adapters added later may list some).
LIGHT_BACKBONE = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
                  'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32}
REFUSED_CANDIDATES = [
    ('double_heads/dh-faster-rcnn_r50_fpn_1x_coco.py',
     {**LIGHT_BACKBONE, 'model.rpn_head.in_channels': 32,
      'model.roi_head.bbox_roi_extractor.out_channels': 32,
      'model.roi_head.bbox_head.in_channels': 32}),
    ('tood/tood_r50_fpn_1x_coco.py',
     {**LIGHT_BACKBONE, 'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32}),
    ('paa/paa_r50_fpn_1x_coco.py',
     {**LIGHT_BACKBONE, 'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32}),
    ('vfnet/vfnet_r50_fpn_1x_coco.py',
     {**LIGHT_BACKBONE, 'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32}),
    ('condinst/condinst_r50_fpn_ms-poly-90k_coco_instance.py',
     {**LIGHT_BACKBONE, 'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32,
      'model.mask_head.mask_feature_head.in_channels': 32,
      'model.mask_head.mask_feature_head.feat_channels': 16}),
    ('rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py', {}),
]


def _registered_heads():
    import mmdet.models  # noqa: F401  (fill mmdet's registry)
    from mmdet.models.dense_heads import DETRHead
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    from mmdet.models.dense_heads.base_mask_head import BaseMaskHead
    from mmdet.models.roi_heads.base_roi_head import BaseRoIHead
    from mmdet.models.roi_heads.bbox_heads import BBoxHead, SABLHead
    from mmdet.registry import MODELS

    # SABLHead is no BBoxHead; SOLO's heads are mask heads
    roots = (BaseDenseHead, BaseMaskHead, BBoxHead, BaseRoIHead, DETRHead, SABLHead)
    return {name: cls for name, cls in sorted(MODELS.module_dict.items())
            if inspect.isclass(cls) and issubclass(cls, roots) and not inspect.isabstract(cls)}


HEADS = _registered_heads()


def _supported(cls):
    return [m for m in head_matches(cls) if not m.overrides]


def _uninitialised(cls):
    """An instance of ``cls`` that ran only ``nn.Module.__init__`` (its own would build
    layers): enough for a rule that must not look inside a refused head."""
    head = cls.__new__(cls)
    nn.Module.__init__(head)
    return head


def _detector_with(head, path):
    """A bare ``nn.Module`` holding ``head`` at the dotted ``path`` (``roi_head.bbox_head``)."""
    model = node = nn.Module()
    *parents, last = path.split('.')
    for part in parents:
        child = nn.Module()
        setattr(node, part, child)
        node = child
    setattr(node, last, head)
    return model


def test_the_registry_walk_finds_every_family():
    assert len(HEADS) > 60
    assert {'CornerHead', 'PAAHead', 'Shared2FCBBoxHead', 'StandardRoIHead', 'DINOHead',
            'YOLOXHead', 'SparseRoIHead'} <= set(HEADS)


@pytest.mark.parametrize('name', sorted(HEADS))
def test_every_registered_head_is_supported_or_refused(name):
    """Supported: the nearest listed class is in the head's MRO and every method the adapter
    relies on is that class's own (checked by attribute identity, not by the rule's
    ``__dict__`` walk). Refused: ``build_adapter`` raises the clear error, naming the head and,
    for a subclass of a supported class, that class and the methods it overrides."""
    cls = HEADS[name]
    ok = _supported(cls)
    if ok:
        match = ok[0]
        listed = next(c for c in cls.__mro__ if c.__name__ == match.listed)
        assert match.listed in match.adapter.head_types
        for method in match.adapter.relies_on:
            assert getattr(cls, method, None) is getattr(listed, method, None), method
        return
    matches = head_matches(cls)
    paths = {m.adapter.head_path for m in matches} or {'bbox_head'}
    for path in sorted(paths):
        with pytest.raises(ValueError) as info:
            build_adapter(_detector_with(_uninitialised(cls), path))
        msg = str(info.value)
        assert f'no adapter for the head {name}' in msg
        assert 'docs/DESIGN.md ("Adding a head")' in msg and 'supported heads: [' in msg
        for m in matches:
            if m.adapter.head_path == path:
                assert m.listed in msg and all(o in msg for o in m.overrides), msg


@pytest.mark.parametrize('name', CRASHED)
def test_heads_that_crashed_are_listed_or_refused(name):
    """A head the issue saw crash inside explain is supported only once an adapter lists it
    by name; otherwise the rule refuses it."""
    cls = HEADS[name]
    listed = any(name in a.head_types for a in ADAPTERS.module_dict.values())
    assert listed or not _supported(cls)


#: Adapters of wrappers (the semi-supervised detectors, the tracking models): their
#: ``head_path`` is a whole inner detector, whose own adapter the rule then picks, so they list
#: a detector class, not a head.
WRAPPERS = {'SemiSupervisedAdapter', 'TrackingAdapter'}


def test_listed_heads_are_registered_mmdet_classes():
    heads = [a for name, a in ADAPTERS.module_dict.items() if name not in WRAPPERS]
    names = {t for a in heads for t in a.head_types}
    assert names <= set(HEADS), names - set(HEADS)
    assert {name for name in WRAPPERS if name in ADAPTERS.module_dict} == WRAPPERS
    for adapter in heads:
        assert adapter.relies_on, adapter.__name__
        for method in adapter.relies_on:  # a misspelt name would guard nothing
            assert any(hasattr(cls, method) for cls in HEADS.values()), (adapter, method)


def test_cornernet_is_refused_when_the_engine_is_built():
    """A random-init CornerNet (light hourglass): the clear error at construction."""
    model = build_detector('cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py',
                           cfg_options={'model.backbone.stage_channels': [8, 8, 8, 8, 8, 8],
                                        'model.backbone.feat_channel': 8,
                                        'model.backbone.num_stacks': 1,
                                        'model.bbox_head.in_channels': 8,
                                        'model.bbox_head.num_feat_levels': 1})
    with pytest.raises(ValueError, match=r'no adapter for the head CornerHead; supported heads: '
                                         r'\[.*\]\. See docs/DESIGN\.md \("Adding a head"\)'):
        CAMEngine(model, score_thr=0.0)


def _first_refused():
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from mmdet_cam_hook.testing import mmdet_config

    for config, options in REFUSED_CANDIDATES:
        model = Config.fromfile(mmdet_config(config)).model
        head = model.roi_head.bbox_head if 'roi_head' in model else model.bbox_head
        cls = MODELS.get(head.type)
        if not _supported(cls):
            return build_detector(config, cfg_options=options), cls
    # Every mmdet 3.3 head of the list is supported now: a user's subclass of a supported head
    # that overrides what its adapter relies on (its forward) is the refusal to check.
    model = build_detector('rtmdet/rtmdet_tiny_8xb32-300e_coco.py')
    base = type(model.bbox_head)

    class UsersHead(base):
        def forward(self, x):
            return super().forward(x)

    model.bbox_head.__class__ = UsersHead
    return model, UsersHead


def test_a_refused_subclass_fails_at_construction_not_in_explain():
    """A real head that subclasses a supported class but overrides what its adapter relies on
    (Double-Head R-CNN's ``DoubleConvFCBBoxHead.forward`` on this branch) is refused by
    ``CAMEngine(...)`` and by the hook's ``before_run``, before any forward."""
    model, cls = _first_refused()
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(args))
    pattern = (rf'no adapter for the head {cls.__name__} \(it subclasses \w+ \(\w+\) but '
               r'overrides [\w, ]+, which \w+ relies on')
    with pytest.raises(ValueError, match=pattern) as info:
        CAMEngine(model, score_thr=0.0)
    assert 'docs/DESIGN.md ("Adding a head")' in str(info.value)
    runner = SimpleNamespace(model=model)  # before_run refuses before it reads anything else
    with pytest.raises(ValueError, match=re.escape(str(info.value))):
        DetCAMHook().before_run(runner)
    assert calls == []


@pytest.mark.parametrize('roi_head, rpn_head, message', [
    ('MultiInstanceRoIHead', 'RPNHead', r'its roi_head MultiInstanceRoIHead subclasses '
                                        r'StandardRoIHead but overrides [\w, ]*predict_bbox'),
    ('DoubleHeadRoIHead', 'RPNHead', r'its roi_head DoubleHeadRoIHead subclasses '
                                     r'StandardRoIHead but overrides _bbox_forward'),
    ('StandardRoIHead', 'CascadeRPNHead', r"its rpn_head CascadeRPNHead is none of \['RPNHead'\]"),
    ('StandardRoIHead', 'StageCascadeRPNHead', r'its rpn_head StageCascadeRPNHead subclasses '
                                               r'RPNHead but overrides [\w, ]*forward'),
    ('StandardRoIHead', None, r'TwoStageAdapter needs a `rpn_head`, the model has none'),
])
def test_a_part_the_adapter_runs_is_checked_by_the_same_rule(roi_head, rpn_head, message):
    """Two-stage models: the box head (``Shared2FCBBoxHead``) is supported, but the RoI head or
    the RPN the adapter runs itself is not (CrowdDet's multi-instance RoI head, Double-Head
    R-CNN's RoI head, Cascade RPN, Fast R-CNN without an RPN): refused, naming that part,
    before anything runs."""
    if any(roi_head in a.head_types or (rpn_head in a.head_types and a.head_path == 'rpn_head'
                                        and a.__name__ != 'RPNAdapter')
           for a in ADAPTERS.module_dict.values()):
        pytest.skip(f'an adapter lists {roi_head} or {rpn_head} now')
    model = _detector_with(_uninitialised(HEADS[roi_head]), 'roi_head')
    model.roi_head.bbox_head = _uninitialised(HEADS['Shared2FCBBoxHead'])
    if rpn_head:
        model.rpn_head = _uninitialised(HEADS[rpn_head])
    with pytest.raises(ValueError, match=r'no adapter for the head Shared2FCBBoxHead \('
                                         r'TwoStageAdapter takes ConvFCBBoxHead, but ' + message):
        build_adapter(model)


def test_a_module_run_once_per_level_is_no_level_layer():
    """A module run once per level (DyHead's blocks) outputs only the last call's map, so it
    is no level layer: the maps are taken from a tuple that holds them (``path:i``), else the
    level-aware default is refused at build, naming the module."""
    import torch

    from mmdet_cam_hook.adapters import trace_level_layers

    model = nn.Module()
    model.conv = nn.Conv2d(3, 3, 1)
    model.down = nn.AvgPool2d(2)

    def features(x):
        return model.conv(x), model.conv(model.down(x))

    with pytest.raises(ValueError, match=r"level\(s\) \[0, 1\] alone or in a tuple: 'conv' "
                                         r'runs once for each of the levels \[0, 1\]; pass '
                                         r'`target_layers`'):
        trace_level_layers(model, features, 8)

    class Pair(nn.Module):  # outputs both maps, as DyHead does
        def forward(self, x):
            return model.conv(x), model.conv(model.down(x))

    model.pair = Pair()
    assert trace_level_layers(model, model.pair, 8) == ['pair:0', 'pair:1']
    model.conv2 = nn.Conv2d(3, 3, 1)
    assert trace_level_layers(model, lambda x: (model.conv(x), model.conv2(model.down(x))),
                              8) == ['conv', 'conv2']
    assert torch.is_grad_enabled()
