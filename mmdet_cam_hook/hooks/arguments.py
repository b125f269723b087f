"""The arguments of :class:`~mmdet_cam_hook.hooks.cam_hook.DetCAMHook` that need more than the
shared checks of :mod:`mmdet_cam_hook.checks`: ``methods`` and ``target_layers`` when the hook is
built, and in ``before_run`` what only the run knows (``contrast`` against the head's classes,
the runner's test pipeline, the hooks the detector family's configs register).
"""
from collections.abc import Mapping
from typing import List, Optional, Sequence

from torch import nn

from ..cam.methods import METHODS, CAMMethod
from ..cam.targets import num_classes, resolve_contrast
from ..runtime.pipeline import test_pipeline_cfg


def check_method_specs(methods):
    """The hook's ``methods`` as a config gives them: a name, a dict or a list of those (a
    method object from python too).

    Raises:
        TypeError: On an element that is none of these, naming it.
    """
    specs = [methods] if isinstance(methods, (str, Mapping, CAMMethod)) else methods
    if isinstance(specs, (list, tuple)):
        for spec in specs:
            if not isinstance(spec, (str, Mapping, CAMMethod)):
                raise TypeError(f'`methods` must be a str (one of {sorted(METHODS)}), a '
                                f"dict(type='drise', num_masks=...) or a method object, or a "
                                f'list of them; got {spec!r} ({type(spec).__name__})')
    return methods


def check_target_layers(target_layers) -> Optional[List[str]]:
    """The hook's ``target_layers``: None, a layer name or a list of them (resolved against the
    model in ``before_run``).

    Raises:
        TypeError: On anything else, naming it.
        ValueError: On an empty list.
    """
    if target_layers is None:
        return None
    names = [target_layers] if isinstance(target_layers, str) else target_layers
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError('`target_layers` must be None, a layer name or a list of them '
                        f'(e.g. ["neck.out_convs.0"]), got {target_layers!r}')
    if not names:
        raise ValueError('`target_layers` must name at least one layer, or be None for the '
                         'level-aware default, got []')
    return list(names)


def check_contrast_classes(contrast, runner, model: nn.Module, adapter) -> None:
    """``contrast`` against the head's classes (and, for a class name, the model's or the
    visualizer's class names when either has them; else at the first explanation).

    Raises:
        ValueError: On a class the head does not have (naming the valid choices).
    """
    if contrast is None:
        return
    classes = None
    for meta in (getattr(model, 'dataset_meta', None),
                 getattr(runner.visualizer, 'dataset_meta', None)):
        if meta and meta.get('classes'):
            classes = list(meta['classes'])
            break
    if isinstance(contrast, str) and classes is None:
        return
    resolve_contrast(contrast, classes, num_classes(adapter))


def runner_test_pipeline(runner, model: nn.Module) -> Optional[list]:
    """The runner config's test pipeline (test, else val dataloader); None lets the engine
    take it from ``model.cfg``.

    Raises:
        ValueError: If neither the runner's config nor ``model.cfg`` has one.
    """
    try:
        return test_pipeline_cfg(runner.cfg)
    except ValueError as exc:
        if getattr(model, 'cfg', None) is not None:
            return None
        raise ValueError('DetCAMHook needs the test pipeline: build the runner from a '
                         'config with `test_dataloader` or `val_dataloader` '
                         '(Runner.from_cfg), or set `model.cfg`') from exc


def warn_missing_hooks(runner, model: nn.Module, required: Sequence[str]) -> None:
    """Warn when the runner lacks hooks that mmdet's configs of this detector family
    register: the usual cause is a config that replaced ``custom_hooks``."""
    registered = {c.__name__ for h in runner.hooks for c in type(h).__mro__}
    missing = [h for h in required if h not in registered]
    if missing:
        family = type(model).__name__
        runner.logger.warning(
            f'DetCAMHook: this {family} model runs without {", ".join(missing)}, '
            f"which mmdet's {family} configs register in `custom_hooks`; a config that sets "
            "`custom_hooks = [dict(type='DetCAMHook', ...)]` replaces the inherited "
            'list. Keep them: `custom_hooks = [*_base_.custom_hooks, '
            "dict(type='DetCAMHook', ...)]`.")
