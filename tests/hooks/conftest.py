"""What the hook tests share: the data set their tiny runs train on."""
import pytest

from mmdet_cam_hook.testing import tiny_shapes


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """:func:`~mmdet_cam_hook.testing.tiny_shapes`: 4 training and 2 validation images (some
    non-square, exact instance masks) in COCO format, made once per test module."""
    return tiny_shapes(tmp_path_factory.mktemp('data'))
