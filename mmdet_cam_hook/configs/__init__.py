"""The MMEngine configs shipped inside the package, and where they are once it is installed.

The other ``.py`` files in this folder (``yolox_{nano,tiny,s,m,l,x}_gradcam.py``,
``rtmdet_{tiny,s}_gradcam.py``, ``retinanet_r50_fpn_gradcam.py``, ``fcos_r50_gradcam.py``,
``atss_r50_gradcam.py``, ``gfl_r50_gradcam.py``, ``yolov3_{d53,mobilenetv2}_gradcam.py``,
``_base_/gradcam_hook.py``, ``demo/yolox_nano_shapes_gradcam.py``,
``demo/rtmdet_tiny_shapes_gradcam.py``, ...) are configs for ``Config.fromfile``, not modules to
import. They inherit mmdet's own configs through ``mmdet::<family>/...``, which works wherever
mmdet is installed, keep those configs' ``custom_hooks`` and add ``DetCAMHook``.

A config of your own inherits one of them through its absolute path::

    python -m mmdet_cam_hook.configs            # prints every config's path

    # my_yolox_s.py
    _base_ = '/.../site-packages/mmdet_cam_hook/configs/yolox_s_gradcam.py'

MMEngine's own ``package::path`` syntax does not reach these files: MMEngine 0.10 resolves it
only for the OpenMMLab packages in its fixed table (``mmengine.config.utils.MODULE2PACKAGE``),
through ``<package>/.mim/model-index.yml``. The command-line tool and the demo accept
``mmdet_cam_hook::yolox_s_gradcam.py`` themselves (:func:`resolve_config`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ['CONFIG_DIR', 'SCOPE', 'config_path', 'list_configs', 'resolve_config']

#: The folder of the shipped configs.
CONFIG_DIR = Path(__file__).resolve().parent
#: Prefix that :func:`resolve_config` replaces by :data:`CONFIG_DIR`.
SCOPE = 'mmdet_cam_hook::'


def list_configs() -> list[str]:
    """The shipped configs, by name relative to :data:`CONFIG_DIR`.

    Returns:
        list[str]: Sorted names such as ``'yolox_s_gradcam.py'``, ``'_base_/gradcam_hook.py'``
        and ``'demo/yolox_nano_shapes_gradcam.py'``.
    """
    return sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob('*.py')
                  if not p.name.startswith('__'))


def config_path(name: str) -> str:
    """The absolute path of a shipped config, for ``_base_`` or ``Config.fromfile``.

    Args:
        name (str): Its name relative to :data:`CONFIG_DIR` (see :func:`list_configs`), such
            as ``'yolox_s_gradcam.py'``; a leading ``'mmdet_cam_hook::'`` is accepted.

    Returns:
        str: The path.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: If no shipped config has that name; the message lists the names.
    """
    if not isinstance(name, str):
        raise TypeError(f'`name` must be a str such as \'yolox_s_gradcam.py\', got {name!r}')
    relative = name[len(SCOPE):] if name.startswith(SCOPE) else name
    names = list_configs()
    if relative not in names:
        raise ValueError(f'no config {name!r} in mmdet_cam_hook; the shipped configs are '
                         f'{names}')
    return str(CONFIG_DIR / relative)


def resolve_config(config: Union[str, os.PathLike]) -> Union[str, os.PathLike]:
    """``mmdet_cam_hook::NAME`` as the shipped config's path; anything else unchanged.

    Args:
        config (str | PathLike): A config file, ``mmdet::...``, or ``mmdet_cam_hook::NAME``.

    Returns:
        str | PathLike: The path to give ``Config.fromfile``.

    Raises:
        ValueError: If ``config`` starts with ``mmdet_cam_hook::`` and names no shipped config.
    """
    if isinstance(config, str) and config.startswith(SCOPE):
        return config_path(config)
    return config
