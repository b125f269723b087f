"""The one table of methods as objects: names, configured objects and config dicts through
``method_from``; D-RISE's options on its object (and the engine's ``drise_*`` shorthand); the
detections and torch maps a ``CAMResult`` carries. The maths of each gradient method against
grad-cam is ``test_maths.py`` (one row per entry of ``CAM_METHODS``)."""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine, compute_cams
from mmdet_cam_hook.cam import maths
from mmdet_cam_hook.cam.methods import (
    CAM_METHODS,
    DRISE,
    METHODS,
    GradientMethod,
    PerturbationMethod,
    check_methods,
    method_from,
)


@pytest.fixture(scope='module')
def nano():
    from mmdet_cam_hook.testing import build_yolox

    return build_yolox('nano', input_size=64)


@pytest.fixture(scope='module')
def image():
    from mmdet_cam_hook.testing import synthetic_image

    return synthetic_image(48, 64)


def test_every_entry_holds_its_maths_or_its_explain():
    for name, method in METHODS.items():
        assert method.name == name
        if name in CAM_METHODS:
            assert isinstance(method, GradientMethod) and not method.black_box
            assert method.raw is getattr(maths, method.raw.__name__)  # the maths module's
            assert method.options == {}
        else:
            assert isinstance(method, PerturbationMethod) and method.black_box
    assert CAM_METHODS == tuple(n for n in METHODS if n != 'drise')
    assert METHODS['drise'] == DRISE()


def test_method_from_names_objects_and_dicts():
    assert method_from('hirescam') is METHODS['hirescam']
    configured = DRISE(num_masks=50)
    assert method_from(configured) is configured
    assert method_from(dict(type='drise', num_masks=50)) == configured
    assert method_from(dict(type='drise', num_masks=50)).seed == 0
    assert method_from(dict(type='gradcam')) is METHODS['gradcam']
    assert METHODS['drise'].num_masks == 1000  # configuring copies, the table is unchanged
    assert check_methods(['gradcam', 'drise', 'gradcam']) == ['gradcam', 'drise']
    with pytest.raises(TypeError, match='must be a str'):  # the names-only form (the hook's)
        check_methods([configured])


@pytest.mark.parametrize('spec, error, match', [
    ('grad', ValueError, r"`method` must be one of \[.*'drise'.*'gradcam'.*\], got 'grad'"),
    (dict(type='gradcm'), ValueError, r"must be one of \[.*'gradcam'.*\], got 'gradcm'"),
    (dict(num_masks=5), ValueError, r"needs a `type`, one of \[.*'drise'"),
    (dict(type='drise', masks=5), ValueError,
     r"'drise' has no option\(s\) \['masks'\]; its options are \['batch_size', 'num_masks', "
     r"'seed'\]"),
    (dict(type='gradcam', num_masks=5), ValueError, r"'gradcam' has no option\(s\)"),
    (dict(type='drise', num_masks=0), ValueError, '`num_masks` must be a positive int, got 0'),
    (3, TypeError, r'must be a method name \(one of \[.*\]\), a method object or a dict'),
])
def test_bad_method_specs(spec, error, match):
    with pytest.raises(error, match=match):
        method_from(spec)


def test_drise_options_are_checked():
    with pytest.raises(TypeError, match="`seed` must be an int >= 0, got '0'"):
        DRISE(seed='0')
    with pytest.raises(TypeError, match='`batch_size` must be a positive int, got 1.5'):
        DRISE(batch_size=1.5)


def test_two_differently_configured_methods_of_one_name_are_refused(nano):
    engine = CAMEngine(nano, score_thr=0.0, topk=1)
    with pytest.raises(ValueError, match="two different 'drise' methods"):
        engine.explain(np.zeros((32, 32, 3), np.uint8),
                       methods=[DRISE(num_masks=4), dict(type='drise', num_masks=8)])


def test_drise_object_equals_the_engine_shorthand(nano, image):
    """``DRISE(num_masks=...)`` in ``methods`` and ``CAMEngine(drise_masks=...)`` with the name
    give the same maps; the object keeps its own options on any engine; the name means the
    engine's configured entry."""
    short = CAMEngine(nano, score_thr=0.0, topk=2, drise_masks=8, drise_seed=3)
    want = short.explain(image, methods='drise')['drise']
    default = CAMEngine(nano, score_thr=0.0, topk=2)
    assert default.drise == DRISE() and short.drise == DRISE(num_masks=8, seed=3)
    for spec in (DRISE(num_masks=8, seed=3), dict(type='drise', num_masks=8, seed=3)):
        got = default.explain(image, methods=['hirescam', spec])
        assert set(got) == {'hirescam', 'drise'} and got['drise'].method == 'drise'
        np.testing.assert_array_equal(got['drise'].cams, want.cams)
        assert got['drise'].layers == [[]] * len(want)
    other = default.explain(image, methods=[DRISE(num_masks=8, seed=4)])['drise']
    assert not np.array_equal(other.cams, want.cams)
    batch = default.explain_batch([image], methods=[DRISE(num_masks=8, seed=3)])
    np.testing.assert_array_equal(batch[0]['drise'].cams, want.cams)
    one = compute_cams(nano, image, method=DRISE(num_masks=8, seed=3), score_thr=0.0, topk=2)
    np.testing.assert_array_equal(one.cams, want.cams)


def test_result_carries_its_detections_and_torch_maps(nano, image):
    engine = CAMEngine(nano, score_thr=0.0, topk=3)
    res = engine.explain(image, methods=['gradcam', 'eigencam'], max_size=32)
    dets = engine.detect(image)
    for r in res.values():
        assert r.detections is not None and len(r.detections) == len(r) == 3
        for field in ('bboxes', 'labels', 'scores', 'levels', 'ys', 'xs', 'anchors'):
            assert torch.equal(getattr(r.detections, field), getattr(dets, field)), field
        # the result's boxes are in the returned (downscaled) image; the detections' are not
        np.testing.assert_allclose(r.bboxes, dets.bboxes.numpy() * r.scale, rtol=1e-6)
        t = r.tensors()
        assert t.cams.device == dets.bboxes.device and t.cams.dtype == torch.float32
        np.testing.assert_array_equal(t.cams.numpy(), r.cams)
        np.testing.assert_array_equal(t.combined.numpy(), r.combined)
        np.testing.assert_array_equal(t.input_cams.numpy(), r.input_cams)
    assert 'detections' not in repr(res['gradcam'])
    given = engine.explain(image, methods='gradcam', detections=dets.select([1]))['gradcam']
    assert torch.equal(given.detections.ys, dets.ys[1:2])
