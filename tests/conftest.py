"""Shared fixtures: random-init YOLOX models from mmdet's own configs, at small input sizes; one
torch thread for a module; MMEngine's singletons dropped after each test."""
import pytest

from mmdet_cam_hook.testing import SIZES, build_yolox, mmdet_config, synthetic_image, yolox_config

__all__ = ['SIZES', 'build_yolox', 'mmdet_config', 'synthetic_image', 'yolox_config']


@pytest.fixture
def make_yolox():
    """Factory fixture: ``make_yolox(size='nano', input_size=128, num_classes=3, seed=0)``."""
    return build_yolox


@pytest.fixture
def make_image():
    """Factory fixture: ``make_image(h=96, w=160, seed=0)`` -> BGR uint8 array."""
    return synthetic_image


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op torch thread for a module's tests (``pytestmark =
    pytest.mark.usefixtures('one_thread')``), restored after it: these models are tiny, and on
    a busy 2-core machine OpenMP's spinning threads made a training step 100x slower (13 s
    instead of 0.04 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_mmengine_singletons():
    """MMEngine's ManagerMixin singletons (visualizer, logger, message hub, default scope) leak
    between tests; drop them after each test."""
    yield
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer

    for cls in (Visualizer, DefaultScope, MessageHub, MMLogger):
        cls._instance_dict.clear()
