"""Packaging for mmdet-cam-hook. Exact versions of the stack live in
requirements/constraints.txt; here are only the ranges the code needs."""
import os.path as osp

from setuptools import find_packages, setup


def _version():
    scope = {}
    with open(osp.join(osp.dirname(__file__), 'mmdet_cam_hook', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmdet-cam-hook',
    version=_version(),
    description='Per-detection class-activation maps for MMDetection 3.x detectors, '
    'as an MMEngine hook and a command-line tool',
    long_description=open(osp.join(osp.dirname(__file__), 'README.md')).read()
    if osp.exists(osp.join(osp.dirname(__file__), 'README.md')) else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    # The configs ship as package data: `_base_` and `demo` hold configs, not modules, so
    # they are listed here instead of being made importable with an `__init__.py`.
    packages=find_packages(include=['mmdet_cam_hook', 'mmdet_cam_hook.*'])
    + ['mmdet_cam_hook.configs._base_', 'mmdet_cam_hook.configs.demo'],
    install_requires=[
        'torch>=2.0',
        'numpy<2',
        'opencv-python',
        'mmengine>=0.10,<0.11',
        'mmcv>=2.0,<2.2',
        'mmdet>=3.3,<3.4',
    ],
    # Visualizer backends the hook is tested with (MLflow: mlflow-skinny 3.12, the last
    # release whose file store works without MLFLOW_ALLOW_FILE_STORE, which MMEngine's
    # MLflowVisBackend uses by default).
    extras_require={
        # pytorch-grad-cam's own classes: the per-detection reference the tests and
        # benchmarks compare the maps with (mmdet_cam_hook.testing.reference); maps need none of it.
        'reference': ['grad-cam==1.5.7'],
        'tensorboard': ['tensorboard'],
        'mlflow': ['mlflow-skinny>=3,<3.13'],
        'wandb': ['wandb'],
        # text-prompted detectors (Grounding DINO): mmdet 3.3's language models use
        # transformers' BertModel and tokenizers; versions checked with mmdet 3.3.0 here
        'multimodal': ['transformers>=4.40,<5', 'tokenizers'],
    },
    entry_points={'console_scripts': ['mmdet-cam=mmdet_cam_hook.cli.cam:main',
                                      'mmdet-cam-eval=mmdet_cam_hook.cli.eval:main']},
)
