"""The model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018), per detection.

A map that explains the model must change when the model's learned parameters are destroyed.
The check randomises the detector in cascade, from the top: the head, then the neck too, then
the backbone too (the stages come from the adapter, :meth:`DetectorAdapter.stages
<mmdet_cam_hook.adapters.DetectorAdapter.stages>`, and hold every parameter: two-stage
detectors' ``roi_head`` then ``rpn_head``, DETR's ``head``, ``decoder`` and ``encoder``, before
the neck and the backbone), each stage on a deep copy (the user's model is never touched), and
compares each detection's map on the randomised copy with its map on the original model by the
Spearman rank correlation of their pixels,

    ``rho = pearson(rank(map_original), rank(map_randomised))`` (ties get their average rank).

The randomised copy explains the **same detections** (same priors, labels and boxes, through
``CAMEngine.explain(detections=...)``), not its own, which would be a different set. A faithful
method's similarity drops towards 0 as more of the model is randomised; a method whose maps
stay similar (e.g. an edge detector in disguise) fails the check.

Randomisation, seeded: every parameter tensor of the stage has its entries permuted at random
(:func:`permute_parameters`). This keeps each tensor's distribution, so activations keep their
scale and maps do not go blank for numerical reasons, while it destroys what was learned.
(Adebayo et al. re-draw from the initialisation distribution instead; a permutation needs no
knowledge of each layer's initialiser.) BatchNorm running statistics (buffers) are kept.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..adapters import build_adapter
from ..cam.engine import CAMEngine
from ..runtime.io import ImageLike, load_image

#: ``randomize(module, generator)``: change the module's parameters in place.
Randomizer = Callable[[nn.Module, torch.Generator], None]


def rank_correlations(maps: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (pixels as samples; average ranks for
    ties). Where one map of a pair is constant (e.g. blank, as a fully randomised model often
    gives) and the other is not, nothing of the ranking survived: 0. Where both are constant it
    is undefined: NaN (left out of means).

    Args:
        maps (np.ndarray): (K, H, W).
        others (np.ndarray): (K, H, W).

    Returns:
        np.ndarray: (K,) float64 in [-1, 1] or NaN.
    """
    from scipy.stats import rankdata

    maps, others = np.asarray(maps), np.asarray(others)
    if maps.shape != others.shape:
        raise ValueError(f'maps of shape {maps.shape} and {others.shape} cannot be compared')
    out = np.full(len(maps), np.nan)
    for k, (a, b) in enumerate(zip(maps, others)):
        ra = rankdata(a.ravel()) - (a.size + 1) / 2
        rb = rankdata(b.ravel()) - (b.size + 1) / 2
        norm = np.sqrt((ra * ra).sum() * (rb * rb).sum())
        if norm > 0:
            out[k] = float((ra * rb).sum() / norm)
        elif (ra * ra).sum() > 0 or (rb * rb).sum() > 0:
            out[k] = 0.0
    return out


def permute_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Permute the entries of every parameter tensor of ``module`` at random, in
    ``named_parameters`` order (see the module docstring)."""
    with torch.no_grad():
        for _, param in module.named_parameters():
            perm = torch.randperm(param.numel(), generator=generator).to(param.device)
            param.copy_(param.reshape(-1)[perm].reshape(param.shape))


def randomized_models(model: nn.Module, seed: int = 0,
                      randomize: Randomizer = permute_parameters,
                      stages: Optional[Mapping[str, Sequence[str]]] = None
                      ) -> List[Tuple[str, nn.Module]]:
    """Cascading randomisation: one deep copy of ``model`` per stage, each with that stage's
    and all earlier stages' parameters randomised.

    Args:
        model (nn.Module): The detector; never modified.
        seed (int): Seed of the randomisation. Defaults to 0.
        randomize (Randomizer): How a part is randomised. Defaults to
            :func:`permute_parameters`.
        stages (Mapping[str, Sequence[str]], optional): ``{stage: [module or parameter
            paths]}``, top first. Defaults to None: the adapter's
            :meth:`~mmdet_cam_hook.adapters.DetectorAdapter.stages` (e.g. ``head``, ``neck``,
            ``backbone``; ``roi_head``, ``rpn_head``, ``neck``, ``backbone`` for two-stage
            detectors), which hold every parameter.

    Returns:
        list[tuple[str, nn.Module]]: ``(cumulative stage name, randomised copy)``, e.g.
        ``('head', ...), ('head+neck', ...), ('head+neck+backbone', ...)``.

    Raises:
        ValueError: If a path of ``stages`` is neither a module nor a parameter of ``model``.
    """
    stages = build_adapter(model).stages() if stages is None else stages
    generator = torch.Generator().manual_seed(int(seed))
    current = copy.deepcopy(model)
    names: List[str] = []
    out = []
    for name, paths in stages.items():
        for part in _parts(current, paths, name):
            randomize(part, generator)
        names.append(name)
        out.append(('+'.join(names), current))
        current = copy.deepcopy(current)
    return out


def _parts(model: nn.Module, paths: Sequence[str], stage: str) -> List[nn.Module]:
    """The modules at ``paths``; a parameter path comes as a module holding that very
    parameter (so randomising the module changes the model's)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    parts = []
    for path in paths:
        if path in modules:
            parts.append(modules[path])
        elif path in params:
            holder = nn.Module()
            holder.register_parameter(path.replace('.', '_'), params[path])
            parts.append(holder)
        else:
            raise ValueError(f'stage {stage!r}: {type(model).__name__} has no module or '
                             f'parameter {path!r}')
    return parts


def randomized_engines(engine: CAMEngine, seed: int = 0,
                       randomize: Randomizer = permute_parameters) -> List[Tuple[str, CAMEngine]]:
    """An engine per randomisation stage, with ``engine``'s layers, thresholds and ``drise``
    settings, on :func:`randomized_models` copies of its model (built from the model's
    ``.cfg``). Build them once and reuse them for every image: each holds a copy of the model.
    """
    layers = None if engine.level_aware else engine.layer_names
    out = []
    for stage, model in randomized_models(engine.model, seed=seed, randomize=randomize,
                                          stages=engine.adapter.stages()):
        other = CAMEngine(model, target_layers=layers, score_thr=engine.score_thr,
                          topk=engine.topk, drise_masks=engine.drise.num_masks,
                          drise_batch_size=engine.drise.batch_size,
                          drise_seed=engine.drise.seed,
                          keep_input_cams=engine.keep_input_cams, chunk_size=engine.chunk_size)
        out.append((stage, other))
    return out


def randomization_check(engine: CAMEngine, image: ImageLike, methods: Sequence[str], *,
                        seed: int = 0, randomize: Randomizer = permute_parameters,
                        engines: Optional[List[Tuple[str, CAMEngine]]] = None
                        ) -> Dict[str, Dict[str, np.ndarray]]:
    """The sanity check on one image: per method and stage, the rank correlation of each
    detection's map on the original and on the randomised model.

    Args:
        engine (CAMEngine): The engine on the original model (its detections are explained).
        image (str | PathLike | np.ndarray): The image.
        methods (Sequence[str]): Methods of :data:`~mmdet_cam_hook.METHODS`.
        seed (int): Seed of the randomisation. Defaults to 0.
        randomize (Randomizer): How a part is randomised. Defaults to
            :func:`permute_parameters`.
        engines (list[tuple[str, CAMEngine]], optional): Pre-built
            :func:`randomized_engines` (then ``seed`` and ``randomize`` are not used).
            Defaults to None (built here).

    Returns:
        dict[str, dict[str, np.ndarray]]: ``{method: {stage: (K,) correlations}}``.
    """
    img = load_image(image)
    dets = engine.detect(img)
    engines = randomized_engines(engine, seed, randomize) if engines is None else engines
    out: Dict[str, Dict[str, np.ndarray]] = {}
    original = engine.explain(img, methods=list(methods), detections=dets)
    for method in methods:
        out[method] = {}
        for stage, other in engines:
            res = other.explain(img, methods=[method], detections=dets)[method]
            out[method][stage] = rank_correlations(original[method].cams, res.cams)
    return out
