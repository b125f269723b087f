"""``mmdet-cam --texts``: a text-prompted detector (Grounding DINO from mmdet's config, a tiny
BERT built here) through main(), each detection labelled with its phrase; ``--texts`` for a
detector without a prompt is a usage error naming why."""
import cv2
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cli.cam import main
from mmdet_cam_hook.testing import build_yolox, detector_config, synthetic_image

pytest.importorskip('transformers', reason='the multimodal extra (transformers) is missing')

from mmdet_cam_hook.testing.text import (  # noqa: E402
    GROUNDING_DINO,
    SMALL_GROUNDING,
    build_grounding_dino,
    tiny_bert,
)


def test_texts_label_the_detections(tmp_path, capsys, monkeypatch):
    torch.set_num_threads(1)
    bert = tiny_bert(tmp_path / 'bert')
    model = build_grounding_dino(bert)
    # a fresh config: building the model wrote the detector's own keys into model.cfg's head
    detector_config(GROUNDING_DINO, cfg_options={
        **SMALL_GROUNDING, 'model.language_model.name': bert}).dump(str(tmp_path / 'gd.py'))
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=('red car', 'person', 'dog')))),
               tmp_path / 'gd.pth')
    image = synthetic_image(100, 140, seed=3)
    cv2.imwrite(str(tmp_path / 'street.png'), image)
    monkeypatch.chdir(tmp_path)
    assert main(['gd.py', 'gd.pth', 'street.png', '--out-dir', 'out', '--topk', '2',
                 '--score-thr', '0', '--device', 'cpu', '--save-raw',
                 '--texts', 'blue circle . small thing']) == 0, capsys.readouterr().err
    raw = np.load(tmp_path / 'out' / 'street_gradcam.npz')
    assert [str(c) for c in raw['class_names']] == ['blue circle', 'small thing']
    dets = CAMEngine(model, score_thr=0.0, topk=2).detect(image, texts='blue circle . small '
                                                                       'thing')
    np.testing.assert_array_equal(raw['labels'], dets.labels.numpy())
    np.testing.assert_allclose(raw['scores'], dets.scores.numpy(), rtol=1e-6)
    assert raw['cams'].shape == (2, 100, 140)


def test_texts_for_a_detector_without_prompt(tmp_path, capsys, monkeypatch):
    model = build_yolox()
    model.cfg.dump(str(tmp_path / 'yolox.py'))
    torch.save(dict(state_dict=model.state_dict()), tmp_path / 'yolox.pth')
    cv2.imwrite(str(tmp_path / 'street.png'), synthetic_image(96, 96))
    monkeypatch.chdir(tmp_path)
    assert main(['yolox.py', 'yolox.pth', 'street.png', '--device', 'cpu',
                 '--texts', 'a car']) == 1
    assert '`texts` is for text-prompted detectors' in capsys.readouterr().err
