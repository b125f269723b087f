"""The CAM engine's API on YOLOX: several layers, every YOLOX size, golden values, warnings,
bad input, model state. Every head's maps, decoding and geometry: tests/test_adapters.py."""
import warnings

import cv2
import numpy as np
import pytest
import torch

from mmdet_cam_hook import METHODS, CAMEngine, compute_cams
from mmdet_cam_hook.cam.geometry import Letterbox, resize_maps
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing.reference import reference_input_cams

ALL_METHODS = sorted(METHODS)


def _reference(model, engine, image, res, idx=None):
    """grad-cam's own class, one call per detection (``idx``: which ones; default all), with the
    model state restored after."""
    inputs, meta = preprocess(model, engine.pipeline, image)
    # the prior (level, y, x) behind each detection, from the engine's own decoding
    adapter = engine.adapter
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta,
                              engine.score_thr)
    dets = dets.select(slice(0, len(res)))
    np.testing.assert_allclose(dets.scores.numpy(), res.scores, rtol=1e-6)
    idx = list(range(len(res))) if idx is None else list(idx)
    dets = dets.select(torch.tensor(idx, dtype=torch.long))
    try:
        return reference_input_cams(model, inputs, res.method, [res.layers[i] for i in idx],
                                    dets)
    finally:
        model.zero_grad(set_to_none=True)


def _two_per_level(levels):
    return [i for lv in sorted(set(levels.tolist())) for i in np.flatnonzero(levels == lv)[:2]]


def test_named_shared_layers_equal_grad_cam(make_yolox, make_image):
    """Several named layers shared by all levels: grad-cam's average of their maps (one
    upstream layer per head is in tests/test_adapters.py)."""
    layers = ['backbone.stage4', 'neck.reduce_layers[0]']
    model = make_yolox('nano', input_size=64)  # 84 priors: every one is a detection
    image = make_image(64, 48, seed=2)
    engine = CAMEngine(model, target_layers=layers, score_thr=0.0)
    for method in ('gradcam', 'gradcam++', 'hirescam'):
        res = engine.explain(image, methods=method)[method]
        assert res.layers[0] == [engine.layer_names[i] for i in range(len(layers))]
        idx = _two_per_level(res.levels)
        assert len(idx) == 6
        np.testing.assert_allclose(res.input_cams[idx],
                                   _reference(model, engine, image, res, idx),
                                   atol=1e-4, err_msg=method)


def test_gradcam_golden_values():
    """Grad-CAM on hand-set activations and gradients (2 channels, 2x2), computed by hand:
    weights = mean of each gradient channel = [0.5, -0.25];
    cam = ReLU(0.5 * A0 - 0.25 * A1) = ReLU([[0.5-0.5, 1-0], [0-0.25, 2-1]]) = [[0, 1], [0, 1]]
    (before min-max: [[0, 1], [-0.25->0, 1]]), then scaled to [0, 1] and resized to 2x2."""
    from mmdet_cam_hook.cam.maths import input_maps

    def layer_maps(method, acts, grads, size, num):
        return input_maps([METHODS[method].layer_maps(acts, grads, num)], size)

    acts = torch.tensor([[[[1., 2.], [0., 4.]], [[2., 0.], [1., 4.]]]])
    grads = torch.tensor([[[[1., 0.], [0., 1.]], [[-1., 0.], [0., 0.]]]])
    cam = layer_maps('gradcam', acts, grads, (2, 2), 1)
    np.testing.assert_allclose(cam[0], [[0., 1.], [0., 1.]], atol=1e-6)
    # HiResCAM keeps the location: sum_c G*A = [[1-2, 0], [0, 4]] -> ReLU -> [[0,0],[0,4]] -> [0,1]
    cam = layer_maps('hirescam', acts, grads, (2, 2), 1)
    np.testing.assert_allclose(cam[0], [[0., 0.], [0., 1.]], atol=1e-6)
    # XGrad-CAM: w_c = sum(G*A)/sum(A): c0 = (1+4)/7, c1 = -2/7 -> 5/7*A0 - 2/7*A1
    # = [[1/7, 10/7], [-2/7, 12/7]] -> ReLU -> min-max over [0, 12/7] -> [[1/12, 10/12], [0, 1]]
    cam = layer_maps('xgradcam', acts, grads, (2, 2), 1)
    np.testing.assert_allclose(cam[0], [[1 / 12, 10 / 12], [0., 1.]], atol=1e-5)


def test_fixed_stride32_layer_warns_for_stride8_detection(make_yolox, make_image):
    model = make_yolox('nano', input_size=128)
    image = make_image(128, 128, seed=4)
    with pytest.warns(UserWarning, match=r"neck\.out_convs\.2.*level 0 \(stride 8\).*"
                      r"neck\.out_convs\.0"):
        res = compute_cams(model, image, target_layers=['neck.out_convs[-1]'], score_thr=0.0)
    blank = res.cams[res.levels == 0]
    assert len(blank) and blank.max() == 0
    assert res.cams[res.levels == 2].max() > 0


def test_geometry_peak_lands_on_original_pixel():
    """A map peaking at the network-input location of original pixel (x0, y0) of a non-square
    image comes back peaking at (x0, y0), within one network-input pixel."""
    ori_h, ori_w, size = 300, 500, 128
    scale = min(size / ori_h, size / ori_w)
    new_w, new_h = int(ori_w * scale + 0.5), int(ori_h * scale + 0.5)
    box = Letterbox((ori_h, ori_w), (size, size), (new_w / ori_w, new_h / ori_h))
    assert box.resized_shape == (new_h, new_w) == (77, 128)
    tol = 1.0 / scale  # one network-input pixel, in original pixels
    for x0, y0 in [(37, 250), (400, 20), (250, 150), (499, 299)]:
        xi, yi = box.point_to_input(x0 + 0.5, y0 + 0.5)
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        m = np.exp(-((xx - xi)**2 + (yy - yi)**2) / 2.0)[None].astype(np.float32)
        m[0, new_h:] = 1.0  # the padding must be cropped, not stretched onto the image
        back = box.to_original(m)[0]
        back[back >= 0.999] = 0  # ignore what bleeds in from the cropped padding edge
        py, px = np.unravel_index(np.argmax(back), back.shape)
        assert abs(px - x0) <= tol and abs(py - y0) <= tol, (x0, y0, px, py)


@pytest.mark.parametrize('grid, out_shape', [
    ((16, 16), None), ((40, 40), None), ((128, 128), None), ((16, 16), (45, 75)),
    ((33, 20), (600, 1000))])
def test_grid_to_original_is_resize_then_to_original(grid, out_shape):
    """A layer's maps straight to the image equal resizing them to the input grid, cropping the
    padding and resizing to the image (down-, up- and not resized; a 300x500 image letterboxed
    into 128x128, so 51 padded rows)."""
    box = Letterbox((300, 500), (128, 128), (128 / 500, 77 / 300))
    maps = torch.rand((3, *grid), generator=torch.Generator().manual_seed(0))
    want = box.to_original(resize_maps(maps, (128, 128)), out_shape)
    got = box.grid_to_original(maps, out_shape)
    assert got.shape == want.shape == (3, *(out_shape or (300, 500)))
    # F.interpolate places its float32 samples with float32 arithmetic: ~1e-5 apart at most.
    torch.testing.assert_close(got, want, atol=3e-5, rtol=0)
    assert box.grid_to_original(maps[:0], out_shape).shape == (0, *want.shape[1:])


@pytest.mark.parametrize('bad, exc, match', [
    (dict(method='gradcm'), ValueError, r"`method` must be one of \[.*'gradcam'.*\], got 'gradcm'"),
    (dict(target_layers=['neck.out_conv.2']), ValueError, r"close matches: \['neck\.out_convs\.2'"),
    (dict(target_layers=['neck.out_convs[7]']), ValueError, 'unknown target layer'),
    (dict(target_layers=[]), ValueError, 'at least one layer'),
    (dict(score_thr=1.5), ValueError, r'`score_thr` must be a number in \[0, 1\], got 1.5'),
    (dict(topk=0), ValueError, '`topk` must be None or a positive int, got 0'),
])
def test_bad_arguments(make_yolox, make_image, bad, exc, match):
    model = make_yolox('nano', input_size=64)
    with pytest.raises(exc, match=match):
        compute_cams(model, make_image(), **bad)


def test_tuple_output_layer_is_a_clear_error(make_yolox, make_image):
    model = make_yolox('nano', input_size=64)
    with pytest.raises(ValueError, match="'neck' outputs a tuple"):
        compute_cams(model, make_image(), target_layers='neck')


def test_bad_images(make_yolox, tmp_path):
    model = make_yolox('nano', input_size=64)
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        engine.explain(tmp_path / 'missing.jpg')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    with pytest.raises(ValueError, match='could not be decoded'):
        engine.explain(tmp_path / 'broken.jpg')
    with pytest.raises(ValueError, match='uint8.*uint16'):
        engine.explain(np.zeros((32, 32, 3), np.uint16))
    with pytest.raises(ValueError, match=r'got shape \(32, 32, 2\)'):
        engine.explain(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(TypeError, match='path or an HxWx3'):
        engine.explain([[0]])
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    bgra = rng.integers(0, 255, (40, 50, 4), dtype=np.uint8)
    # files are read as the model's pipeline reads them: colour, 8-bit
    cv2.imwrite(str(tmp_path / 'gray.png'), gray)
    cv2.imwrite(str(tmp_path / 'rgba.png'), bgra)
    cv2.imwrite(str(tmp_path / 'deep.png'), (gray.astype(np.uint16) * 257))
    for image in (gray, bgra, tmp_path / 'gray.png', tmp_path / 'rgba.png',
                  tmp_path / 'deep.png'):
        res = engine.explain(image)['gradcam']
        assert res.image.shape == (40, 50, 3) and res.cams.shape[1:] == (40, 50)
    res = engine.explain(np.full((1, 1, 3), 200, np.uint8))['gradcam']
    assert res.cams.shape[1:] == (1, 1) and res.combined.shape == (1, 1)


def test_empty_files_and_folders_are_clear_errors(make_yolox, tmp_path):
    """A 0-byte file is 'could not be decoded' (not a raw cv2.error); a folder says so."""
    engine = CAMEngine(make_yolox('nano', input_size=64), score_thr=0.0, topk=2)
    (tmp_path / 'empty.jpg').write_bytes(b'')
    with pytest.raises(ValueError, match="'.*empty.jpg' could not be decoded"):
        engine.explain(tmp_path / 'empty.jpg')
    with pytest.raises(IsADirectoryError, match='is a directory'):
        engine.explain(tmp_path)


@pytest.mark.parametrize('hw', [(1, 2000), (2, 4000), (3000, 1)])
def test_thin_images_are_a_clear_error(make_yolox, hw):
    engine = CAMEngine(make_yolox('nano', input_size=64), score_thr=0.0, topk=2)
    h, w = hw
    with pytest.raises(ValueError, match=f'{w}x{h} .*could not resize|could not resize.*{w}x{h}'):
        engine.explain(np.full((h, w, 3), 100, np.uint8))


def test_works_under_inference_mode_and_no_grad(make_yolox, make_image):
    """``compute_cams`` is called from inference code: same maps inside ``inference_mode``."""
    model = make_yolox('nano', input_size=64)
    image = make_image(96, 160, seed=2)
    ref = compute_cams(model, image, method='hirescam', score_thr=0.0, topk=3)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            res = compute_cams(model, image, method='hirescam', score_thr=0.0, topk=3)
        assert len(res) == 3
        np.testing.assert_array_equal(res.cams, ref.cams)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_max_size_bounds_the_maps_not_the_detections(make_yolox, make_image):
    """``max_size`` shrinks the returned image and maps (boxes follow), the network still
    sees the whole image: same detections, maps equal the full-size ones downscaled."""
    model = make_yolox('nano', input_size=64)
    image = cv2.resize(make_image(96, 160, seed=3), (1200, 720), interpolation=cv2.INTER_LINEAR)
    engine = CAMEngine(model, score_thr=0.0, topk=4)
    full = engine.explain(image, methods=['gradcam'])['gradcam']
    small = engine.explain(image, methods=['gradcam'], max_size=300)['gradcam']
    assert full.scale == 1.0 and small.scale == pytest.approx(0.25)
    assert small.image.shape == (180, 300, 3) and small.cams.shape == (4, 180, 300)
    assert small.combined.shape == (180, 300)
    np.testing.assert_array_equal(small.scores, full.scores)
    np.testing.assert_allclose(small.bboxes, full.bboxes * 0.25, rtol=1e-6)
    np.testing.assert_array_equal(small.input_cams, full.input_cams)
    down = np.stack([cv2.resize(c, (300, 180), interpolation=cv2.INTER_AREA) for c in full.cams])
    assert np.abs(small.cams - down).mean() < 0.02
    # an image already small enough is returned as it is
    same = engine.explain(image, methods=['gradcam'], max_size=5000)['gradcam']
    assert same.scale == 1.0 and same.image.shape == image.shape
    with pytest.raises(ValueError, match='`max_size` must be None or a positive int, got 0'):
        engine.explain(image, max_size=0)


def test_no_detections_is_an_empty_result(make_yolox, make_image):
    model = make_yolox('nano', input_size=64, confident=False)
    res = compute_cams(model, make_image(), score_thr=0.3)
    assert len(res) == 0
    assert res.cams.shape == (0, 96, 160) and res.bboxes.shape == (0, 4)
    assert res.combined.shape == (96, 160) and res.combined.max() == 0


def test_renormalize_within_boxes(make_yolox, make_image):
    model = make_yolox('nano', input_size=128)
    res = compute_cams(model, make_image(), score_thr=0.05, topk=4, renormalize=True)
    for cam, (x1, y1, x2, y2) in zip(res.cams, res.bboxes):
        outside = cam.copy()
        outside[max(int(np.floor(y1)), 0):int(np.ceil(y2)),
                max(int(np.floor(x1)), 0):int(np.ceil(x2))] = 0
        assert outside.max() == 0
        # grad-cam's min-max divides by (1e-7 + max): faint maps peak just under 1
        assert cam.max() > 0.99 or cam.max() == 0
    # Inside each box: grad-cam's own scale_cam_image of the plain map there.
    from pytorch_grad_cam.utils.image import scale_cam_image

    plain = compute_cams(model, make_image(), score_thr=0.05, topk=4)
    for cam, raw, (x1, y1, x2, y2) in zip(res.cams, plain.cams, plain.bboxes):
        rows = slice(max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), raw.shape[0]))
        cols = slice(max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), raw.shape[1]))
        if raw[rows, cols].size == 0:  # a box wholly outside the image: nothing left
            assert cam.max() == 0
            continue
        np.testing.assert_allclose(cam[rows, cols], scale_cam_image(raw[None, rows, cols])[0],
                                   atol=1e-6)


def _state(model):
    return ([m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules()), torch.is_grad_enabled())


@pytest.mark.parametrize('fail', [False, True])
@pytest.mark.parametrize('layers', [None, ['backbone.stage4']])
def test_model_state_is_restored(make_yolox, make_image, fail, layers, monkeypatch):
    model = make_yolox('nano', input_size=64)
    model.train()
    model.backbone.stem.eval()  # a mixed state must come back exactly
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    engine = CAMEngine(model, target_layers=layers, score_thr=0.0, topk=3)
    with torch.no_grad():
        before = _state(model)
    if fail:
        def boom(*args, **kwargs):
            raise RuntimeError('boom')

        monkeypatch.setattr(engine.adapter, 'decode', boom)
        with torch.no_grad(), pytest.raises(RuntimeError, match='boom'):
            engine.explain(make_image(), methods=['gradcam', 'eigencam'])
    else:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            engine.explain(make_image(), methods=['gradcam', 'eigencam'])
        assert not [w for w in caught if 'gradient path' in str(w.message)]
    with torch.no_grad():
        after = _state(model)
    assert after[0] == before[0]
    assert after[2] == before[2]
    assert after[3] == before[3]
    for b, a in zip(before[1], after[1]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize('size', ['tiny', 's', 'm', 'l', 'x'])
def test_every_yolox_size(make_yolox, make_image, size):
    """The other sizes of mmdet's YOLOX configs (nano is a row of tests/test_adapters.py) take
    the local-window shortcut too, and their maps equal grad-cam's class run once per
    detection."""
    model = make_yolox(size, input_size=64)
    image = make_image(48, 80, seed=5)
    engine = CAMEngine(model, score_thr=0.0, topk=4)
    assert engine.local_grad.available
    res = engine.explain(image, methods='hirescam')['hirescam']
    assert len(res) == 4 and res.cams.shape == (4, 48, 80)
    idx = _two_per_level(res.levels)[:2]
    np.testing.assert_allclose(res.input_cams[idx], _reference(model, engine, image, res, idx),
                               atol=1e-4)


@pytest.mark.parametrize('layers', [None, ['backbone.stage4']])
def test_explain_batch_equals_explain(make_yolox, make_image, layers):
    """Three images of different sizes through the network as one batch (YOLOX pads every image
    to one size): each image's results equal its own ``explain``. With a chain-route layer the
    engine is not batchable and explains them one at a time, with the same results."""
    model = make_yolox('nano', input_size=128)
    engine = CAMEngine(model, target_layers=layers, score_thr=0.0, topk=4)
    assert engine.batchable == (layers is None)
    images = [make_image(96, 160, seed=0), make_image(120, 90, seed=1), make_image(64, 64, 2)]
    methods = ['gradcam', 'hirescam', 'eigencam']
    batch = engine.explain_batch(images, methods=methods)
    assert len(batch) == 3
    for image, got in zip(images, batch):
        want = engine.explain(image, methods=methods)
        for m in methods:
            assert len(got[m]) == 4 and got[m].image.shape == image.shape
            np.testing.assert_allclose(got[m].scores, want[m].scores, rtol=1e-5)
            np.testing.assert_allclose(got[m].bboxes, want[m].bboxes, atol=1e-3)
            np.testing.assert_allclose(got[m].cams, want[m].cams, atol=1e-4, err_msg=m)
    assert engine.explain_batch([]) == []


def test_explain_batch_names_the_bad_image(make_yolox, make_image):
    engine = CAMEngine(make_yolox('nano', input_size=128), score_thr=0.0, topk=2)
    with pytest.raises(ValueError, match='image 1 of the batch.*2000x1'):
        engine.explain_batch([make_image(96, 160), np.zeros((1, 2000, 3), np.uint8)])
    with pytest.raises(ValueError, match='image 0 of the batch.*uint8'):
        engine.explain_batch([np.zeros((8, 8, 3), np.float32)])


def test_without_input_cams(make_yolox, make_image):
    """``keep_input_cams=False`` (the hook's and the CLI's engines): the same maps on the image
    (one layer's go there straight from its grid: equal to float rounding), no maps on the input
    grid."""
    model = make_yolox('nano', input_size=128)
    image = make_image(96, 160)
    kept = CAMEngine(model, score_thr=0.0, topk=5).explain(image, ['gradcam', 'eigencam'])
    lean = CAMEngine(model, score_thr=0.0, topk=5, keep_input_cams=False).explain(
        image, ['gradcam', 'eigencam'])
    for m in kept:
        assert kept[m].input_cams.shape == (5, 128, 128) and lean[m].input_cams is None
        np.testing.assert_allclose(lean[m].cams, kept[m].cams, atol=3e-5)
        np.testing.assert_allclose(lean[m].combined, kept[m].combined, atol=3e-5)
