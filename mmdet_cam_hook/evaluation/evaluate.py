"""Is the map faithful? Deletion / insertion protocols on a real detector, the evaluation loop
behind ``mmdet-cam-eval``, and the small probe the hook runs.

The curves themselves (perturbation, fills, tie-break, AUC) are :mod:`.faithfulness`'s; this
module decides *which score* a curve tracks, the one thing the published protocols disagree on
(``shared/reference`` survey, section 1.2). Two protocols, both deterministic for a seed and
batched (one forward pass per ``batch_size`` perturbed images):

- ``prior``: the score of the detection's own prior for its own label on the perturbed image,
  ``s_k(x') = adapter.scores(head(x'), prior_k, label_k)`` (e.g. ``sigmoid(cls_c) *
  sigmoid(obj)`` at level l, row y, column x for YOLOX). Exact and cheap, and only possible
  because the engine knows the prior behind each kept box. It does not follow the object to a
  neighbouring prior, so it can under-report when another prior takes over. For a two-stage
  detector the "prior" is the detection's RoI: the RoI head re-classifies the same RoI on the
  perturbed image's features (the RPN is not re-run).
- ``matched``: D-RISE's similarity between the detection and the perturbed image's own
  detections (``model.predict``'s, kept at the head's ``test_cfg.score_thr``),
  ``s_k(x') = max_j IoU(b_k, b_j) * cos(P_k, P_j) * s_j`` (Petsiuk et al., CVPR 2021), with
  **one-hot class vectors** ``P`` (the decoded label), so ``cos = [l_j == l_k]``, and the
  detection score ``s_j`` in place of the objectness: the same similarity
  :func:`~mmdet_cam_hook.cam.drise.similarity` that weights D-RISE's masks. On the unperturbed
  image it finds the detection itself: ``1 * 1 * s_k``. ODExAI / D-CLOSE use the softmax
  class-probability vectors instead (their ``cos`` is below 1 for the same label), so their
  numbers are comparable in protocol, not to the last digit.

Numbers from different fills, step counts or protocols are not comparable with each other; the
evaluation records the settings next to them.

Per detection, the evaluation also computes the localisation numbers of
:mod:`.metrics` against the ground truth (pointing game, energy-based pointing game,
off-target share), counts blank maps (never averaged in as 0), and optionally the
randomisation check of :mod:`.sanity`. Every method is compared with the baselines ``random``
and ``box`` (:func:`~mmdet_cam_hook.evaluation.faithfulness.random_maps`,
:func:`~mmdet_cam_hook.evaluation.faithfulness.box_maps`) on the same detections.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..adapters import Detections
from ..cam.drise import similarity
from ..cam.engine import CAMEngine
from ..cam.methods import check_methods
from ..checks import check_int
from ..runtime.detector import BatchedDetector, image_outputs, model_score_thr
from ..runtime.io import ImageLike, load_image
from .faithfulness import ScoreFn, box_maps, check_fill, deletion_insertion, random_maps
from .metrics import MASK_KEYS, MASK_NAMES, MapScores, detection_scores, match_to_ground_truth
from .sanity import rank_correlations

#: The protocols, by name (see the module docstring).
PROTOCOLS = ('prior', 'matched')

#: Baseline maps every evaluation table holds, next to the methods of :data:`METHODS`.
BASELINES = ('random', 'box')


def check_protocols(protocols, arg: str = 'protocols') -> List[str]:
    """Validate one protocol name or a non-empty list of them (``'both'`` means all).

    Raises:
        ValueError: On an unknown or empty protocol list.
    """
    if isinstance(protocols, str):
        protocols = list(PROTOCOLS) if protocols == 'both' else [protocols]
    protocols = list(dict.fromkeys(protocols))
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f'`{arg}` must be one of {[*PROTOCOLS, "both"]} (or a list of '
                         f'{list(PROTOCOLS)}), got {bad[0] if bad else protocols!r}')
    return protocols


# ---------------------------------------------------------------------------------------------
# Score functions (the protocols)
def prior_score_fn(detector: BatchedDetector, dets: Detections) -> ScoreFn:
    """``prior`` protocol: the score of each detection's own prior and label.

    Args:
        detector (BatchedDetector): The detector on batches (one forward pass per call).
        dets (Detections): The detections (their ``levels, ys, xs, anchors, labels`` are read).

    Returns:
        ScoreFn: ``score_fn(images, k) -> (B,)`` as :func:`deletion_insertion` calls it.
    """

    def score_fn(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        outs, _ = detector.outputs(list(images))
        out = np.empty(len(idx), np.float64)
        device = dets.levels.device
        with torch.no_grad():
            for i, k in enumerate(idx.tolist()):
                one = dets.select(torch.tensor([k], device=device))
                out[i] = float(detector.adapter.scores(image_outputs(outs, i), one)[0])
        return out

    return score_fn


def matched_score_fn(detector: BatchedDetector, bboxes: np.ndarray, labels: np.ndarray,
                     score_thr: Optional[float] = None) -> ScoreFn:
    """``matched`` protocol: D-RISE similarity to the perturbed image's best detection.

    Args:
        detector (BatchedDetector): The detector on batches.
        bboxes (np.ndarray): (K, 4) the detections' boxes, in the perturbed images' pixels.
        labels (np.ndarray): (K,) their labels.
        score_thr (float, optional): Detections of a perturbed image kept for the match.
            Defaults to None (the head's ``test_cfg.score_thr``: what ``model.predict`` keeps).

    Returns:
        ScoreFn: ``score_fn(images, k) -> (B,)``.
    """
    bboxes = np.asarray(bboxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    thr = model_score_thr(detector.adapter) if score_thr is None else float(score_thr)

    def score_fn(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        found = detector.detect(list(images), thr)
        return np.array([similarity(bboxes[k:k + 1], labels[k:k + 1], *found[i])[0]
                         for i, k in enumerate(idx.tolist())], np.float64)

    return score_fn


def protocol_curves(detector: BatchedDetector, image: np.ndarray, cams: np.ndarray,
                    dets: Detections, protocol: str, *, bboxes: Optional[np.ndarray] = None,
                    steps: int = 20, fill: str = 'blur', batch_size: int = 16,
                    seed: int = 0):
    """Deletion and insertion curves of K maps under one protocol.

    Args:
        detector (BatchedDetector): The detector on batches.
        image (np.ndarray): (H, W, 3) uint8 BGR image that is perturbed.
        cams (np.ndarray): (K, H, W) one map per detection, on ``image``.
        dets (Detections): The detections the maps explain (priors and labels).
        protocol (str): One of :data:`PROTOCOLS`.
        bboxes (np.ndarray, optional): (K, 4) boxes in ``image``'s pixels for ``matched``.
            Defaults to None (``dets.bboxes``).
        steps (int): Points on each curve after the first. Defaults to 20.
        fill (str): What removed pixels become (``blur``, ``grey``, ``noise``). Defaults to
            'blur'.
        batch_size (int): Perturbed images per forward pass. Defaults to 16.
        seed (int): Seed of the tie-break and of the ``noise`` fill. Defaults to 0.

    Returns:
        Curves: See :class:`~mmdet_cam_hook.evaluation.faithfulness.Curves`.
    """
    (protocol, ) = check_protocols(protocol, 'protocol')
    if protocol == 'prior':
        score_fn = prior_score_fn(detector, dets)
    else:
        boxes = dets.bboxes.detach().cpu().numpy() if bboxes is None else bboxes
        score_fn = matched_score_fn(detector, boxes, dets.labels.cpu().numpy())
    return deletion_insertion(image, cams, score_fn, steps=steps, fill=fill,
                              batch_size=batch_size, seed=seed)


# ---------------------------------------------------------------------------------------------
# One image
def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a run seeded with ``seed``: the same whichever process
    evaluates the image, so that a distributed run equals a one-process run."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def baseline_maps(name: str, bboxes: np.ndarray, shape: Tuple[int, int],
                  seed: int) -> np.ndarray:
    """The maps of a baseline of :data:`BASELINES` for K detections."""
    if name == 'random':
        return random_maps(len(bboxes), shape, seed=seed)
    return box_maps(bboxes, shape)


@dataclass
class EvalSettings:
    """What :func:`evaluate_image` measures, and how.

    Attributes:
        methods (list[str]): Methods of :data:`METHODS`; :data:`BASELINES` are added.
        protocols (list[str]): Of :data:`PROTOCOLS`.
        steps (int): Points per curve after the first.
        fill (str): ``blur``, ``grey`` or ``noise``.
        batch_size (int): Perturbed images per forward pass.
        seed (int): Run seed (each image's seed is :func:`image_seed`).
    """

    methods: List[str]
    protocols: List[str]
    steps: int = 20
    fill: str = 'blur'
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        self.methods = [m for m in check_methods(self.methods) if m not in BASELINES]
        self.protocols = check_protocols(self.protocols)
        check_fill(self.fill)
        for arg in ('steps', 'batch_size'):
            check_int(getattr(self, arg), arg)

    @property
    def all_methods(self) -> List[str]:
        return [*self.methods, *BASELINES]


def evaluate_image(engine: CAMEngine, image: ImageLike, gt_bboxes: np.ndarray,
                   gt_labels: np.ndarray, settings: EvalSettings, index: int = 0,
                   randomized: Optional[Sequence[Tuple[str, CAMEngine]]] = None,
                   keep: Optional[dict] = None) -> dict:
    """Every number of every method for the detections of one image, per detection.

    Each method is explained on its own (so that its time is its own) for the same
    detections (decoded once, :func:`detect`).

    Args:
        engine (CAMEngine): The engine (its ``score_thr``/``topk`` choose the detections).
        image (str | PathLike | np.ndarray): The image.
        gt_bboxes (np.ndarray): (G, 4) ground-truth boxes in the image's pixels.
        gt_labels (np.ndarray): (G,) their classes.
        settings (EvalSettings): What to measure.
        index (int): The image's index in the run (seeds the baselines and the tie-break).
            Defaults to 0.
        randomized (Sequence[tuple[str, CAMEngine]], optional): ``(stage, engine)`` on
            randomised copies of the model (:func:`.sanity.randomized_engines`)
            for the randomisation check. Defaults to None (not run).
        keep (dict, optional): Filled, when given, with ``detections`` (the
            :class:`~mmdet_cam_hook.adapters.Detections` explained) and ``maps``
            (``{method: (K, H, W) maps}``), for a report. Defaults to None.

    Returns:
        dict: ``{method: record}``, each record holding per-detection lists (``pointing``,
        ``epg``, ``off_target`` with NaN where undefined, ``blank``, ``deletion_auc`` and
        ``insertion_auc`` per protocol, the curves themselves as ``deletion_curve`` and
        ``insertion_curve`` per protocol, (K, steps + 1), over ``fractions``,
        ``randomization`` per stage) and the method's ``seconds``; merge records of many
        images with :func:`summarize`.
    """
    img = load_image(image)
    seed = image_seed(settings.seed, index)
    dets = engine.detect(img)
    bboxes = dets.bboxes.detach().cpu().numpy().astype(np.float64)
    labels = dets.labels.cpu().numpy()
    match = match_to_ground_truth(bboxes, labels, gt_bboxes, gt_labels)
    records = {}
    if keep is not None:
        keep.update(detections=dets, maps={})
    # a model with masks: every map is also scored in the instances' own masks (the engine's
    # masks, the same for every method); the mask maps only exist for gradient methods
    masks = (np.zeros((0, *img.shape[:2]), bool)
             if engine.mask_branch is not None and not len(dets) else None)
    for method in settings.all_methods:
        start = time.perf_counter()
        mask_cams = None
        if method in BASELINES:
            cams = baseline_maps(method, bboxes, img.shape[:2], seed)
        elif len(dets):
            res = engine.explain(img, methods=[method], detections=dets)[method]
            cams, mask_cams = res.cams, res.mask_cams
            masks = res.masks if res.masks is not None else masks
        else:
            cams = np.zeros((0, *img.shape[:2]), np.float32)
        seconds = time.perf_counter() - start
        record = dict(seconds=seconds, num_detections=len(dets),
                      **detection_scores(cams, bboxes, match, gt_bboxes, masks, mask_cams),
                      deletion_auc={}, insertion_auc={}, deletion_curve={},
                      insertion_curve={},
                      fractions=(np.arange(settings.steps + 1) / settings.steps).tolist())
        if keep is not None:
            keep['maps'][method] = cams
        for protocol in settings.protocols:
            if len(dets):
                curves = protocol_curves(engine.detector, img, cams, dets, protocol,
                                         steps=settings.steps, fill=settings.fill,
                                         batch_size=settings.batch_size, seed=seed)
                record['deletion_auc'][protocol] = curves.deletion_auc.tolist()
                record['insertion_auc'][protocol] = curves.insertion_auc.tolist()
                record['deletion_curve'][protocol] = curves.deletion.tolist()
                record['insertion_curve'][protocol] = curves.insertion.tolist()
                record['fractions'] = curves.fractions.tolist()
            else:
                for key in ('deletion_auc', 'insertion_auc', 'deletion_curve', 'insertion_curve'):
                    record[key][protocol] = []
        if randomized is not None and method not in BASELINES:
            record['randomization'] = {
                stage: (rank_correlations(
                    cams, other.explain(img, methods=[method], detections=dets)[method].cams)
                    .tolist() if len(dets) else [])
                for stage, other in randomized
            }
        records[method] = record
    return records


# ---------------------------------------------------------------------------------------------
# Many images
def _mean(values: Iterable[float]) -> Optional[float]:
    """Mean of the finite values, None when there are none (JSON has no NaN)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def summarize(records: Sequence[dict], settings: EvalSettings) -> Dict[str, dict]:
    """Per method, the numbers of ``mmdet-cam-eval``'s table and JSON from the records of
    :func:`evaluate_image` (in image order), through :class:`~.metrics.MapScores`, the
    accumulator behind the hook's scalars too: every name means the same thing in both.

    - ``energy_in_box``, ``pointing_game``, ``energy_pointing_game``, ``off_target_share``,
      ``blank_share``: as :class:`~.metrics.MapScores` defines them, means over detections,
      blank maps left out of the first four and counted in ``blank_share`` (their
      deletion/insertion curves count, with the pixels in random order, which is what a blank
      map is worth);
    - for a model with masks, beside these box numbers: ``energy_in_mask`` and
      ``pointing_game_in_mask`` (the map in the instance's own predicted mask), and for
      gradient methods ``mask_energy_in_mask`` and ``mask_pointing_game_in_mask`` (its mask
      map's; None for the others), as :class:`~.metrics.MapScores` defines them;
    - ``deletion_auc`` / ``insertion_auc``: ``{protocol: mean over detections}``;
    - ``num_detections``, ``num_matched`` (detections matched to ground truth, IoU >= 0.5);
    - ``seconds_per_image``: mean time to compute the method's maps for one image;
    - ``randomization_similarity`` (if the records have it): ``{stage: mean Spearman}``.

    Args:
        records (Sequence[dict]): :func:`evaluate_image`'s records, one per image.
        settings (EvalSettings): The settings they were computed with.

    Returns:
        dict[str, dict]: ``{method: numbers}``; a number without data is None.
    """
    out = {}
    curves = [(c, p) for p in settings.protocols for c in ('deletion_auc', 'insertion_auc')]
    for method in settings.all_methods:
        rows = [r[method] for r in records]
        scores = MapScores()
        for row in rows:
            scores.add(row, {f'{c}_{p}': row[c][p] for c, p in curves})
        summary = scores.summary()
        numbers = {name: summary.get(name) for name in (
            'pointing_game', 'energy_pointing_game', 'off_target_share', 'blank_share',
            'energy_in_box')}
        if rows and any(key in rows[0] for key in MASK_KEYS):  # a model with masks
            numbers.update({name: summary.get(name) for name in MASK_NAMES.values()})
        numbers.update(
            deletion_auc={p: summary.get(f'deletion_auc_{p}') for p in settings.protocols},
            insertion_auc={p: summary.get(f'insertion_auc_{p}') for p in settings.protocols},
            num_detections=scores.num_detections, num_matched=scores.num_matched,
            seconds_per_image=_mean(r['seconds'] for r in rows))
        if rows and 'randomization' in rows[0]:
            stages = list(rows[0]['randomization'])
            numbers['randomization_similarity'] = {
                s: _mean(c for r in rows for c in r['randomization'][s]) for s in stages}
        out[method] = numbers
    return out


def markdown_table(summary: Dict[str, dict], protocols: Sequence[str]) -> str:
    """The summary as one markdown table, a row per method (``-`` where there is no data).

    Columns: PG, EPG, off-target, blank, for a model with masks the mask numbers (EiM and
    PGiM: the map's energy in and pointing game in the instance's mask; mask EiM and mask PGiM:
    the mask map's), deletion/insertion AUC per protocol, detections, seconds per image, and
    the randomisation similarity per stage when present.
    """
    stages = next((list(v['randomization_similarity']) for v in summary.values()
                   if v.get('randomization_similarity')), [])
    with_masks = any(MASK_NAMES['energy_in_mask'] in v for v in summary.values())
    mask_columns = dict(energy_in_mask='EiM ↑', pointing_game_in_mask='PGiM ↑',
                        mask_energy_in_mask='mask EiM ↑',
                        mask_pointing_game_in_mask='mask PGiM ↑') if with_masks else {}
    head = ['method', 'PG ↑', 'EPG ↑', 'off-target ↓', 'blank ↓', *mask_columns.values()]
    for p in protocols:
        head += [f'del {p} ↓', f'ins {p} ↑']
    head += ['dets', 's/img'] + [f'rand. {s} ↓' for s in stages]

    def fmt(v, digits=3):
        return '-' if v is None else f'{v:.{digits}f}'

    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for method, v in summary.items():
        row = [method, fmt(v['pointing_game']), fmt(v['energy_pointing_game']),
               fmt(v['off_target_share']), fmt(v['blank_share']),
               *(fmt(v.get(name)) for name in mask_columns)]
        for p in protocols:
            row += [fmt(v['deletion_auc'].get(p)), fmt(v['insertion_auc'].get(p))]
        row += [str(v['num_detections']), fmt(v['seconds_per_image'], 2)]
        rand = v.get('randomization_similarity') or {}
        row += [fmt(rand.get(s)) for s in stages]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------
# The hook's probe
def probe_faithfulness(engine: CAMEngine, image: ImageLike, results: Dict[str, object], *,
                       protocols: Sequence[str] = ('prior', ), steps: int = 10,
                       fill: str = 'blur', batch_size: int = 32, seed: int = 0,
                       curves: Optional[dict] = None) -> Dict[str, float]:
    """Mean deletion and insertion AUC per method for one probe image's results, for
    ``YOLOXGradCAMHook(faithfulness=True)``.

    The detections are the results' own (``CAMResult.detections``: the boxes with their
    priors, RoIs or queries, as the engine explained them), so no forward pass is spent on
    decoding them again; the curves are run on the image the results show (``CAMResult.image``,
    downscaled when the hook's ``max_image_size`` shrank it) with the results' own maps. Cost:
    ``2 * K * (steps + 1)`` images through the network per method and protocol (K
    detections), in batches of ``batch_size``.

    Args:
        engine (CAMEngine): The hook's engine.
        image (str | PathLike | np.ndarray): The probe, as given to ``engine.explain`` (kept
            for the callers; the results carry what is needed).
        results (dict[str, CAMResult]): ``engine.explain(image, methods=...)``'s output.
        protocols (Sequence[str]): Of :data:`PROTOCOLS`. Defaults to ('prior',).
        steps (int): Points per curve after the first. Defaults to 10.
        fill (str): ``blur``, ``grey`` or ``noise``. Defaults to 'blur'.
        batch_size (int): Perturbed images per forward pass. Defaults to 32.
        seed (int): Seed of the tie-break (and the ``noise`` fill). Defaults to 0.
        curves (dict, optional): Filled, when given, with ``{method: {protocol: Curves}}``
            (the curves behind the means, e.g. to plot them). Defaults to None.

    Returns:
        dict[str, float]: ``{f'{method}_deletion_auc_{protocol}': mean,
        f'{method}_insertion_auc_{protocol}': mean}``; empty when there are no detections.

    Raises:
        ValueError: If a result carries no detections (not made by a ``CAMEngine``), or on a
            bad argument.
    """
    protocols, kept = check_protocols(list(protocols)), curves
    if not results:
        return {}
    first = next(iter(results.values()))
    if len(first) == 0:
        return {}
    scalars = {}
    for method, res in results.items():
        if res.detections is None:
            raise ValueError(f'the {method!r} result carries no detections '
                             '(`CAMResult.detections`); pass results of `engine.explain`')
        for protocol in protocols:
            curves = protocol_curves(engine.detector, res.image, res.cams, res.detections,
                                     protocol, bboxes=res.bboxes, steps=steps, fill=fill,
                                     batch_size=batch_size, seed=seed)
            scalars[f'{method}_deletion_auc_{protocol}'] = float(curves.deletion_auc.mean())
            scalars[f'{method}_insertion_auc_{protocol}'] = float(curves.insertion_auc.mean())
            if kept is not None:
                kept.setdefault(method, {})[protocol] = curves
    return scalars


__all__ = [
    'BASELINES', 'PROTOCOLS', 'EvalSettings', 'baseline_maps', 'check_protocols',
    'evaluate_image', 'image_seed', 'markdown_table', 'matched_score_fn', 'prior_score_fn',
    'probe_faithfulness', 'protocol_curves', 'summarize'
]
