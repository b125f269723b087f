"""The hook on a short Grounding DINO fine-tuning run (mmdet's config shrunk, a tiny BERT built
here with ``transformers``) on the shapes data set: the prompt is the dataset's class names, as
mmdet's own validation prompts; every probe is explained at each validation; TensorBoard's
events are read back with its own reader."""
import pytest
from mmengine.runner import Runner

from mmdet_cam_hook.demo.shapes import generate_shapes
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
from mmdet_cam_hook.testing import cam_hook, hooks_of, run_log_dir, run_log_text

pytest.importorskip('transformers', reason='the multimodal extra (transformers) is missing')

from mmdet_cam_hook.testing.text import tiny_bert, tiny_grounding_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def test_grounding_dino_run_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = generate_shapes(tmp_path / 'shapes', num_train=2, num_val=2, image_size=96, seed=0)
    bert = tiny_bert(tmp_path / 'bert')
    methods = ['gradcam', 'eigencam']
    cfg = tiny_grounding_cfg(data, tmp_path / 'work', bert, max_iters=2,
                             hooks=[cam_hook(methods=methods)],
                             backends=('LocalVisBackend', 'TensorboardVisBackend'))
    cfg.train_cfg.val_interval = 2
    runner = Runner.from_cfg(cfg)
    runner.train()

    (hook, ) = hooks_of(runner, DetCAMHook)
    assert type(hook._engine.adapter).__name__ == 'GroundingDINOAdapter'
    assert hook._engine.phrases == list(data.classes)
    log = run_log_text(runner)
    assert 'DetCAMHook: explained 2/2 probe image(s) x 2 method(s)' in log
    assert 'failed after' not in log
    events = EventAccumulator(str(run_log_dir(runner) / 'vis_data'),
                              size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    images = [t for t in events.Tags()['images'] if 'cam_val' in t]
    assert any('gradcam' in t for t in images) and any('eigencam' in t for t in images)
    shares = events.Scalars('cam_val/eigencam_blank_share')
    assert [s.step for s in shares] == [2] and shares[0].value == 0.0


def test_texts_refused_for_a_detector_without_prompt(tmp_path):
    data = generate_shapes(tmp_path / 'shapes', num_train=2, num_val=2, image_size=96, seed=0)
    from mmdet_cam_hook.testing import tiny_cfg

    cfg = tiny_cfg(data, tmp_path / 'work', max_iters=1,
                   hooks=[cam_hook(texts='circle . square')])
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='`texts` is for text-prompted detectors.*YOLOXHead'):
        runner.train()
