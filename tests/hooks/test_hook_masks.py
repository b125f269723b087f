"""DetCAMHook end to end on instance models: short real trainings on the 96 px shapes, whose
annotations hold each shape's exact mask (RLE), with masks loaded (``with_mask=True``) and a
TensorBoard backend; the events read back with TensorBoard's own ``EventAccumulator``.

Per model (a tiny Mask R-CNN shrunk as tests/adapters/test_masks.py and tiny_cfg's Faster R-CNN
are, and an RTMDet-Ins-tiny when its adapter is registered): at each validation the class maps'
and the mask maps' cards are there for every probe and method, every detection card holds its
own instance's mask outline (cyan pixels on the border of the mask the engine predicts for that
detection, re-computed after training) and no other instance's, and the
``{method}_mask_energy_in_mask`` scalars are logged at every validation, in [0, 1].

tests/hooks/test_hook.py covers the hook's box outputs (cards, slots, scalars, state); this
file covers only what masks add.
"""
import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from mmdet_cam_hook.cam.engine import CAMEngine
from mmdet_cam_hook.evaluation.metrics import match_to_ground_truth
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
from mmdet_cam_hook.testing import (
    _drop_pretrained,
    _set_num_classes,
    cam_hook,
    hooks_of,
    mmdet_config,
    run_log_dir,
    run_log_text,
    tiny_cfg,
)
from mmdet_cam_hook.visualization.cards import CARD_WIDTH, OVERVIEW_SLOT, detection_slots
from mmdet_cam_hook.visualization.outlines import resize_masks
from mmdet_cam_hook.visualization.render import MASK_COLOR

pytestmark = pytest.mark.usefixtures('one_thread')

METHODS = ['gradcam', 'hirescam']
RTMDET_INS = 'rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py'


def _load_masks(pipeline):
    for step in pipeline:
        if step['type'] == 'LoadAnnotations':
            step['with_mask'] = True


def mask_rcnn_cfg(data, work_dir):
    """tiny_cfg's Mask R-CNN (ResNet-18, 50 proposals) trained on the shapes' masks, with the
    mask head and RoI extractor shrunk as in tests/adapters/test_masks.py."""
    cfg = tiny_cfg(data, work_dir, detector='mask-rcnn',
                   hooks=[cam_hook(methods=METHODS, score_thr=0.0, topk=3)],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'))
    cfg.merge_from_dict({'model.roi_head.mask_head.conv_out_channels': 32})
    _load_masks(cfg.train_dataloader.dataset.pipeline)
    return cfg


class DiamondMasks(Hook):
    """Before training (after the runner initialised the weights), set RTMDet-Ins's kernel
    predictor so that each prior's dynamic convs draw a diamond around it:
    ``4 * (|dx| + |dy|) < 1.5`` in the head's relative coordinates (layer 0: ``±4 dx``,
    ``±4 dy``, ReLU'd; layer 1: their sum; layer 2: 1.5 minus it), its weights spread so that
    the diamonds vary. A random-init RTMDet-Ins predicts empty masks, and four training steps
    do not change that."""

    priority = 'VERY_HIGH'

    def before_train(self, runner):
        head = runner.model.bbox_head
        n0, n1 = head.dyconv_channels, head.num_prototypes + 2
        w0, w1, w2 = torch.zeros(n0, n1), torch.zeros(n0, n0), torch.zeros(1, n0)
        w0[0, 0], w0[1, 0], w0[2, 1], w0[3, 1] = 4.0, -4.0, 4.0, -4.0
        w1[0, :4] = 1.0
        w2[0, 0] = -1.0
        biases = [torch.zeros(n) for n in head.bias_nums]
        biases[-1][0] = 1.5
        params = torch.cat([w0.flatten(), w1.flatten(), w2.flatten(), *biases])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv in head.rtm_kernel:
                conv.bias.copy_(params)
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.02)


def rtmdet_ins_cfg(data, work_dir):
    """tiny_cfg's RTMDet-tiny run (its EMA and pipeline-switch hooks) with RTMDet-Ins-tiny's
    model from mmdet's config, trained on the shapes' masks from :class:`DiamondMasks`."""
    cfg = tiny_cfg(data, work_dir, detector='rtmdet',
                   hooks=[cam_hook(methods=METHODS, score_thr=0.0, topk=3)],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'))
    model = Config.fromfile(mmdet_config(RTMDET_INS)).model
    _drop_pretrained(model)
    _set_num_classes(model, len(data.classes))
    model.data_preprocessor.batch_augments = None
    cfg.model = model
    _load_masks(cfg.train_dataloader.dataset.pipeline)
    return cfg


#: name: (config, hooks registered on the runner)
MODELS = {
    'mask-rcnn': (mask_rcnn_cfg, ()),
    'rtmdet-ins': (rtmdet_ins_cfg, (DiamondMasks, )),
}


@pytest.fixture(scope='module', params=list(MODELS.values()), ids=list(MODELS))
def run(request, shapes, tmp_path_factory):
    """A 2-epoch training (a validation after each) with the hook; the events read back, and
    the results the hook's engine returned, in call order (one call per probe and validation:
    the maps and masks of the weights the hook saw, RTMDet's EMA weights included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    explained = []
    explain = CAMEngine.explain

    def recording(self, *args, **kwargs):
        results = explain(self, *args, **kwargs)
        explained.append(results)
        return results

    make_cfg, extra_hooks = request.param
    runner = Runner.from_cfg(make_cfg(shapes, tmp_path_factory.mktemp('run')))
    for hook in extra_hooks:
        runner.register_hook(hook())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CAMEngine, 'explain', recording)
        runner.train()
    events = EventAccumulator(str(run_log_dir(runner) / 'vis_data'),
                              size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    (hook, ) = hooks_of(runner, DetCAMHook)
    return runner, hook, events, explained


def _decode(event):
    image = cv2.imdecode(np.frombuffer(event.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (event.height, event.width)
    return image


def _border(mask):
    mask = mask.astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return (mask - cv2.erode(mask, cross, borderValue=0)) > 0


def _near(mask, pixels):
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(_border(mask).astype(np.uint8), kernel) > 0


def test_mask_scalars_in_tensorboard(run):
    runner, hook, events, _ = run
    assert hook._engine.mask_branch is not None
    for method in METHODS:
        energy = events.Scalars(f'cam_val/{method}_mask_energy_in_mask')
        assert [s.step for s in energy] == [1, 2]
        assert all(0.0 <= s.value <= 1.0 for s in energy), energy
    log = run_log_text(runner)
    assert log.count(f'DetCAMHook: explained 2/2 probe image(s) x {len(METHODS)} method(s)') == 2
    assert 'failed after' not in log and 'runs without' not in log


def _box_lines(boxes, shape, width=7):
    """Pixels within ``width // 2`` of the edges of ``boxes`` (drawn over the outlines), the
    boxes clipped to just outside the image as the cards draw them."""
    lines = np.zeros(shape, np.uint8)
    h, w = shape
    boxes = np.clip(boxes, -1.0, [w + 1.0, h + 1.0, w + 1.0, h + 1.0])
    for x1, y1, x2, y2 in np.round(boxes).astype(int):
        cv2.rectangle(lines, (x1, y1), (x2 - 1, y2 - 1), 1, width)
    return lines > 0


def test_cards_outline_each_instance_on_its_own_card(run):
    """The last validation's cards, class and mask views: detection ``k``'s card has cyan
    pixels on at least 80% of instance ``k``'s mask border (its mask as the hook's engine
    predicted it; border pixels under a box line left out) and none away from that border; the
    overview has the outlines of the instances with a card too."""
    runner, hook, events, explained = run
    tags = set(events.Tags()['images'])
    probes = hook._probes['val']
    assert len(explained) == 2 * len(probes)  # one call per probe and validation
    checked = 0
    for probe, results in zip(probes, explained[-len(probes):]):
        for method, result in results.items():
            assert result.masks is not None and result.mask_cams is not None
            gt = probe.gt_bboxes * result.scale
            match = match_to_ground_truth(result.bboxes, result.labels, gt, probe.gt_labels)
            slots = detection_slots(min(hook.max_detection_tiles, len(result)), match)
            factor = CARD_WIDTH / result.image.shape[1]
            height = round(result.image.shape[0] * factor)
            masks = resize_masks(result.masks, (CARD_WIDTH, height))
            lines = _box_lines(np.concatenate([result.bboxes, gt]) * factor, masks.shape[1:])
            for view in (f'cam_val_{method}_{probe.name}', f'cam_val_{method}_mask_{probe.name}'):
                assert f'{view}/{OVERVIEW_SLOT}' in tags, (view, sorted(tags))
                (overview, ) = [e for e in events.Images(f'{view}/{OVERVIEW_SLOT}')
                                if e.step == 2]
                cyan_all = (_decode(overview)[-height:] == MASK_COLOR).all(axis=2)
                for k, slot in enumerate(slots):
                    (last, ) = [e for e in events.Images(f'{view}/{slot}') if e.step == 2]
                    card = _decode(last)
                    assert card.shape[1] == CARD_WIDTH
                    cyan = (card[-height:] == MASK_COLOR).all(axis=2)
                    border = _border(masks[k]) & ~lines
                    if not border.any():
                        assert not (cyan & ~_near(masks[k], 3)).any(), (view, slot)
                        continue
                    assert cyan[border].mean() > 0.8, (view, slot, cyan[border].mean())
                    assert not (cyan & ~_near(masks[k], 3)).any(), (view, slot)
                    assert cyan_all[border].mean() > 0.5, (view, slot)
                    checked += 1
    assert checked >= 4, checked
