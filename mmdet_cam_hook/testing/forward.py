"""One image through an engine's adapter and through the model's own ``predict``: the two
sides the adapter tests compare (decoding, masks, candidates)."""
import contextlib
from typing import Iterator, NamedTuple, Optional

import torch

from ..runtime.pipeline import preprocess
from .models import mmdet_config


class Decoded(NamedTuple):
    """What :func:`decoded` returns."""
    #: (1, 3, H_in, W_in) network input.
    inputs: torch.Tensor
    #: The image's metainfo.
    meta: dict
    #: The head's raw outputs (``adapter.head_outputs``).
    outs: object
    #: The adapter's detections (``Detections``).
    dets: object


def decoded(engine, image, score_thr: Optional[float] = None) -> Decoded:
    """``image`` through ``engine``'s test pipeline, adapter features, head outputs (with the
    image's metainfo, as the engine passes it) and decoding at ``score_thr`` (None: the
    engine's), without gradients."""
    inputs, meta = preprocess(engine.model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        outs = adapter.head_outputs(adapter.features(inputs), [meta])
        dets = adapter.decode(outs, meta, engine.score_thr if score_thr is None else score_thr)
    return Decoded(inputs, meta, outs, dets)


def live_outputs(adapter, inputs: torch.Tensor, meta: dict) -> tuple:
    """``(feats, outs)``: ``adapter``'s level maps of ``inputs`` (computed without gradients)
    as leaves that require grad, and the head outputs on them with their graph, for autograd
    with respect to a level map."""
    with torch.no_grad():
        feats = adapter.features(inputs)
    feats = tuple(f.detach().requires_grad_(True) for f in feats)
    return feats, adapter.head_outputs(feats, [meta])


def predicted(model: torch.nn.Module, inputs: torch.Tensor, meta: dict):
    """``model.predict``'s instances (``pred_instances``) of the one image, highest score
    first (a stable sort: ties keep mmdet's order), without gradients."""
    from mmdet.structures import DetDataSample

    with torch.no_grad():
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    return pred[pred.scores.argsort(descending=True, stable=True)]


def kept_pairs(cands) -> tuple:
    """The candidate (row, label) pairs of ``cands`` (``Candidates``) that became its
    detections: ``(rows, labels, same)``, the pairs' rows and labels (``nonzero`` order) and
    ``same``, their ``cands.rows`` in the detections' order."""
    rows, labels = (cands.kept >= 0).nonzero(as_tuple=True)
    order = cands.kept[rows, labels].argsort()
    return rows, labels, cands.rows(rows[order].tolist(), labels[order].tolist())


@contextlib.contextmanager
def own_test_cfg(model: torch.nn.Module, config: str) -> Iterator:
    """``model.bbox_head``'s ``test_cfg`` set to mmdet's ``config``'s own ``model.test_cfg``
    (its candidates a level, NMS and threshold) inside the block, restored after, also when it
    raised; yields that ``test_cfg``."""
    from mmengine.config import Config, ConfigDict

    own = Config.fromfile(mmdet_config(config)).model.test_cfg
    head = model.bbox_head
    saved = head.test_cfg
    head.test_cfg = ConfigDict(own)
    try:
        yield own
    finally:
        head.test_cfg = saved
