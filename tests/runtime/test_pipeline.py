"""The test pipeline is built in the model's scope (mmdet), whatever default scope is current,
and the current one is restored."""
import numpy as np
import pytest

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.runtime import pipeline as runtime_pipeline


@pytest.fixture
def foreign_scope():
    """A default scope another OpenMMLab program may have left current (conftest drops it).
    Returns a check that it is still the current one (MMEngine restores a scope as a copy)."""
    from mmengine.registry import DefaultScope

    DefaultScope.get_instance('foreign', scope_name='mmengine')

    def is_current():
        scope = DefaultScope.get_current_instance()
        return (scope.instance_name, scope.scope_name) == ('foreign', 'mmengine')

    return is_current


def test_explain_under_a_foreign_default_scope(make_yolox, make_image, request):
    """Was ``KeyError: 'PackDetInputs is not in the mmengine::transform registry'``."""
    model = make_yolox('nano', input_size=64)
    image = make_image(64, 96)
    expected = CAMEngine(model, topk=3).explain(image)['gradcam']
    is_current = request.getfixturevalue('foreign_scope')
    result = CAMEngine(model, topk=3).explain(image)['gradcam']
    assert is_current()
    assert len(result) == len(expected) > 0
    np.testing.assert_allclose(result.cams, expected.cams, atol=1e-6)
    np.testing.assert_array_equal(result.bboxes, expected.bboxes)


def test_build_pipeline_restores_the_scope(make_yolox, foreign_scope):
    model = make_yolox('nano', input_size=64)
    pipeline = runtime_pipeline.build_pipeline(runtime_pipeline.test_pipeline_cfg(model.cfg))
    assert [type(t).__name__ for t in pipeline.transforms][-1] == 'PackDetInputs'
    assert foreign_scope()
    with pytest.raises(KeyError, match='PackDetInputs is not in the mmengine::transform'):
        runtime_pipeline.build_pipeline([dict(type='PackDetInputs')], scope='mmengine')
    assert foreign_scope()
