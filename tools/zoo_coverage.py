"""How much of MMDetection's model zoo the CAM engine explains, measured.

Walks ``mmdet/.mim/model-index.yml`` (every published checkpoint), groups the checkpoints by
(detector type, head types) of their configs, builds one random-init representative per group
(the lightest config of the group, at ``--input-size``, score thresholds at 0, the head
perturbed so that scores do not tie) and checks it the way the tests' table of heads does:

1. ``CAMEngine(model).detect(image)`` equals ``model.predict`` (boxes, labels, scores), exactly;
2. HiResCAM maps of a couple of detections (the best one and one on another level) equal a
   plain full backward of that detection's score (``mmdet_cam_hook.testing.reference``);
   Grad-CAM maps for text-prompted models, prompted with their classes and a tiny BERT saved
   here (mmdet's configs name ``bert-base-uncased``, which is not downloaded).

Each group is then *explained*, *refused* (the engine's clear error at construction, e.g. a
head no adapter supports), *cannot build* here (a missing package, no CPU kernel, a config
not in the wheel, a download), *error* (a bug: the message) or *timeout*. Each group runs in a
forked child process with a timeout, so one slow model does not stall the run.

Usage::

    python tools/zoo_coverage.py                      # print the table and the shares
    python tools/zoo_coverage.py --json docs/zoo_coverage.json --write-readme README.md
    python tools/zoo_coverage.py --only 'PAA|TOOD' --json docs/zoo_coverage.json  # update some

With ``--only`` and an existing ``--json`` file, only the matching groups are replaced in it.
"""
import argparse
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

#: Tasks of ``model-index.yml`` that count as detection + instance segmentation (box maps).
DET_INST = {'Object Detection', 'Instance Segmentation'}
#: Name parts of configs that are slow to build or run on a CPU (a group's lighter config wins).
HEAVY = ('x101', 'r101', 'x152', 'r152', 'swin', 'convnext', 'hourglass', 'res2net', 'regnetx-12',
         'regnetx-8', 'resnest', 'hrnetv2p-w40', 'dcn', '5scale', 'mstrain', 'ms-3x', '3x')
LIGHT = ('r18', 'r50', 'tiny', 'nano', '_s_', 'mobilenet', 'd53')


def mim_root() -> Path:
    """mmdet's ``.mim`` folder (configs and ``model-index.yml``)."""
    import mmdet

    return Path(mmdet.__file__).resolve().parent / '.mim'


def checkpoints(root: Path) -> List[dict]:
    """Every checkpoint of ``model-index.yml``: name, config (relative to ``configs/``) and
    whether its index entry is detection or instance segmentation only."""
    index = yaml.safe_load((root / 'model-index.yml').read_text(encoding='utf-8'))
    out = []
    for meta_file in index['Import']:
        meta = yaml.safe_load((root / meta_file).read_text(encoding='utf-8'))
        for model in meta.get('Models') or []:
            tasks = {r.get('Task') for r in model.get('Results') or []}
            out.append(dict(name=model['Name'], config=model['Config'].split('configs/', 1)[-1],
                            det_inst=bool(tasks) and tasks <= DET_INST
                            and 'Object Detection' in tasks))
    return out


def head_types(node, out: Optional[List[str]] = None) -> List[str]:
    """The ``type`` of every ``*head`` entry of a model config, depth first, each once (the
    RoI extractor's ``shared_head`` and the losses excluded)."""
    out = [] if out is None else out
    if isinstance(node, dict):
        for key, value in node.items():
            if key.startswith('loss') or key == 'shared_head':
                continue
            if key.endswith('head'):
                for head in value if isinstance(value, list) else [value]:
                    if isinstance(head, dict) and 'type' in head and head['type'] not in out:
                        out.append(head['type'])
            head_types(value, out)
    elif isinstance(node, (list, tuple)):
        for value in node:
            head_types(value, out)
    return out


def _weight(config: str, folder: str) -> tuple:
    """Sort key of a group's configs: the group's own folder first, then light, then short."""
    name = config.lower()
    return (config.split('/')[0] != folder, any(h in name for h in HEAVY),
            not any(h in name for h in LIGHT), len(name), name)


def group_checkpoints(root: Path, entries: Sequence[dict],
                      cache: Optional[Path] = None) -> List[dict]:
    """Groups of checkpoints by (detector, heads), with the lightest config of each as its
    representative; configs that cannot be parsed here form groups by (folder, reason), with
    status ``cannot build``. ``cache`` (a JSON file) keeps the parsed keys between runs."""
    from mmengine.config import Config

    groups: Dict[tuple, dict] = OrderedDict()
    parsed: Dict[str, tuple] = {}
    if cache is not None and cache.exists():
        parsed = {c: ((k[0], tuple(k[1])), tuple(f) if f else None)
                  for c, (k, f) in json.loads(cache.read_text(encoding='utf-8')).items()}
    for entry in entries:
        config = entry['config']
        if config not in parsed:
            path = root / 'configs' / config
            try:
                if not path.exists():
                    raise FileNotFoundError(f'config not in the wheel: {config}')
                model = Config.fromfile(str(path)).model
                parsed[config] = ((model.type, tuple(head_types(model))), None)
            except Exception as exc:  # noqa: BLE001  (classified, like a build's)
                reason = _build_reason(exc)
                status = 'error' if reason is None else 'cannot build'
                reason = reason or f'config: {_message(exc)}'
                parsed[config] = ((config.split('/')[0], ('?', reason)), (status, reason))
        key, failed = parsed[config]
        status, reason = failed or (None, None)
        group = groups.setdefault(key, dict(
            detector=key[0], heads=[] if failed else list(key[1]), checkpoints=0, det_inst=0,
            configs=[], names=[], status=status, reason=reason))
        group['checkpoints'] += 1
        group['det_inst'] += int(entry['det_inst'])
        group['names'].append(entry['name'])
        if config not in group['configs']:
            group['configs'].append(config)
    if cache is not None:
        cache.write_text(json.dumps(parsed), encoding='utf-8')
    for group in groups.values():
        folders = [c.split('/')[0] for c in group['configs']]
        folder = max(folders, key=folders.count)
        group['configs'].sort(key=lambda c: _weight(c, folder))
        group['config'] = group['configs'][0]
    return list(groups.values())


# ----------------------------------------------------------------------------- one group
def zoo_config(config: str, input_size: int):
    """mmdet's ``config`` made for a random-init, offline check: no ``Pretrained`` init, every
    ``score_thr`` of the test cfgs at 0, the test pipeline's ``Resize`` (and a fixed ``Pad``)
    at ``input_size``."""
    from mmengine.config import Config

    from mmdet_cam_hook.testing import _drop_pretrained, mmdet_config

    cfg = Config.fromfile(mmdet_config(config))
    _drop_pretrained(cfg.model)

    def walk(node, test):
        if isinstance(node, dict):
            if isinstance(node.get('pretrained'), str):  # DetectoRS's RFP backbone
                node['pretrained'] = None
            for key in ('score_thr', 'conf_thr'):  # YOLOv3's objectness pre-filter too
                if test and key in node:
                    node[key] = 0.0
            kind = node.get('type')
            if kind == 'Resize' and 'scale' in node:
                node['scale'] = (input_size, input_size)
            elif kind == 'Pad' and node.get('size') is not None:
                node['size'] = (input_size, input_size)
            for key, value in node.items():
                walk(value, test or key == 'test_cfg')
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, test)

    walk(cfg.model, False)
    for key in ('test_dataloader', 'val_dataloader'):
        walk(cfg.get(key), False)
    if 'language_model' in cfg.model:  # text-prompted: a tiny BERT saved here, no download
        bert = _tiny_bert()
        cfg.model.language_model.name = bert
        if 'lang_model_name' in cfg.model.get('bbox_head', {}):
            cfg.model.bbox_head.lang_model_name = bert
        if 'num_cp' in cfg.model.get('encoder', {}):
            cfg.model.encoder.num_cp = 0  # activation checkpointing (fairscale): memory only
    return cfg


_BERT: List[str] = []


def _tiny_bert() -> str:
    """A tiny random BERT and its tokenizer saved once per process
    (:func:`mmdet_cam_hook.testing.text.tiny_bert`), for configs naming ``bert-base-uncased``."""
    import tempfile

    from mmdet_cam_hook.testing.text import tiny_bert

    if not _BERT:
        _BERT.append(tiny_bert(tempfile.mkdtemp(prefix='zoo_bert_')))
    return _BERT[0]


def build_model(config: str, input_size: int, seed: int = 0):
    """A random-init model of ``config`` (:func:`zoo_config`), with ``.cfg`` and
    ``dataset_meta``, in eval mode."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    from mmdet_cam_hook.testing import _quiet_init_weights

    cfg = zoo_config(config, input_size)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    _quiet_init_weights(model)
    model.cfg = cfg
    classes = cfg.model.get('bbox_head', {}).get('num_classes', 80)
    model.dataset_meta = dict(classes=tuple(f'class{i}' for i in range(int(classes or 80))))
    return model.eval()


def perturb(model, seed: int = 0) -> None:
    """BatchNorms calibrated where the detector has a dense ``bbox_head``
    (:func:`~mmdet_cam_hook.testing.calibrate_bn`), and Gaussian noise (std 0.01 on weights, 0.5
    on biases) added to every head parameter, so that scores do not tie; the mask predictors
    of a box-less mask head (SOLO's ``conv_mask*``, SOLOv2's ``conv_kernel``) get std 0.3, or
    no mask of the random model passes its threshold and nothing is detected."""
    import torch

    from mmdet_cam_hook.testing import calibrate_bn

    frame = _frame_detector(model)
    if frame is not model:  # a tracking model: its per-frame detector, calibrated on frames
        own, frame.cfg = frame.data_preprocessor, model.cfg  # preprocessed as the tracker does
        frame.data_preprocessor = model.data_preprocessor
        try:
            perturb(frame, seed)
        finally:
            frame.data_preprocessor = own
            del frame.cfg
        model.eval()
        return
    if getattr(model, 'bbox_head', None) is not None and hasattr(model, 'extract_feat') \
            and not hasattr(model, 'forward_transformer') \
            and not hasattr(model, 'language_model'):  # GLIP's head also reads the text
        calibrate_bn(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split('.')[0].endswith('head'):
                std = 0.5 if name.endswith('bias') else 0.01
                if (getattr(model, 'bbox_head', None) is None and name.endswith('weight')
                        and ('.conv_mask' in name or '.conv_kernel' in name)):
                    std = 0.3
                param.add_(torch.randn(param.shape, generator=gen) * std)
    model.eval()


def _frame_detector(model):
    """A tracking model's per-frame ``detector`` (what the engine explains), else the model."""
    from mmdet.models.mot import BaseMOTModel

    detector = getattr(model, 'detector', None)
    return detector if isinstance(model, BaseMOTModel) and detector is not None else model


def _build_reason(exc: BaseException) -> Optional[str]:
    """Why a model cannot be built here, when the cause is outside this package (a missing
    package, no CPU kernel, a config not in the wheel, a download); None otherwise."""
    msg = f'{type(exc).__name__}: {exc}'.splitlines()[0][:200]
    low = msg.lower()
    if isinstance(exc, ModuleNotFoundError):
        return f'needs the package `{exc.name}`'
    if isinstance(exc, ImportError):
        names = re.findall(r"'imports': \['([\w]+)", str(exc))
        return f'needs the package `{names[0]}`' if names else msg
    if isinstance(exc, FileNotFoundError):
        path = str(exc.filename or '').split('.mim/')[-1]
        return ('config not in the wheel' if 'not in the wheel' in msg
                else f'reads a file not in the wheel: {path or msg}')
    wanted = re.findall(r'(\w+) is not installed|install (?:the package )?`?([\w-]+)', low)
    if wanted and isinstance(exc, (RuntimeError, NotImplementedError)):
        return f'needs the package `{next(n for n in wanted[-1] if n)}`: {msg}'
    if any(k in low for k in ('http', 'download', 'urlopen', 'name resolution', 'urlerror')):
        return f'downloads a file: {msg}'
    if 'cpu' in low or 'cuda' in low or 'not implemented' in low:
        return f'no CPU kernel: {msg}'
    return None


def _picked(dets) -> List[int]:
    """The best detection and the best one on another level (or the second best)."""
    levels = dets.levels.tolist()
    other = next((i for i, lv in enumerate(levels) if lv != levels[0]), 1)
    return [0] if len(dets) == 1 else [0, other]


def _same_detections(dets, pred) -> Optional[str]:
    """None if the engine's detections equal ``model.predict``'s, else what differs."""
    import numpy as np

    if len(dets) != len(pred):
        return f'{len(dets)} detections, model.predict has {len(pred)}'

    def table(bboxes, scores, labels):
        rows = np.concatenate([-scores[:, None], labels[:, None], bboxes], 1).astype(np.float64)
        return rows[np.lexsort(rows.T[::-1])]

    ours = table(dets.bboxes.numpy(), dets.scores.numpy(), dets.labels.numpy())
    theirs = table(pred.bboxes.numpy(), pred.scores.numpy(), pred.labels.numpy())
    if not np.array_equal(ours, theirs):
        return f'detections differ from model.predict by {np.abs(ours - theirs).max():.3g}'
    return None


def check_group(config: str, input_size: int) -> dict:
    """Build ``config``'s random-init model and check it (see the module docstring).

    Returns:
        dict: ``status`` and ``reason`` (and ``adapter``, ``detections``, ``max_diff``).
    """
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample

    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.adapters import build_adapter
    from mmdet_cam_hook.runtime.pipeline import preprocess
    from mmdet_cam_hook.testing import synthetic_image
    from mmdet_cam_hook.testing.reference import reference_input_cams

    torch.set_num_threads(1)
    try:
        model = build_model(config, input_size)
    except Exception as exc:  # noqa: BLE001  (classified: outside the package, or an error)
        reason = _build_reason(exc)
        return dict(status='cannot build' if reason else 'error',
                    reason=reason or f'build: {_message(exc)}')
    try:
        build_adapter(model)  # refused before the perturbation (which runs the pipeline)
    except ValueError as exc:
        return dict(status='refused', reason=str(exc).split('; supported heads')[0])
    try:
        perturb(model)
    except Exception as exc:  # noqa: BLE001
        return dict(status='error', reason=f'perturb: {_message(exc)}')
    try:
        engine = CAMEngine(model, score_thr=0.0)
    except ValueError as exc:  # the engine's clear errors at construction
        return dict(status='refused', reason=str(exc).split('; supported heads')[0])
    except Exception as exc:  # noqa: BLE001
        reason = _build_reason(exc)
        return dict(status='cannot build' if reason else 'error',
                    reason=reason or f'CAMEngine(model): {_message(exc)}')
    image = synthetic_image(160, 224, seed=1)
    inputs, meta = preprocess(model, engine.pipeline, image)
    # text-prompted models: the engine's prompt (the classes) as mmdet's own predict takes it;
    # their maps are checked with Grad-CAM (HiResCAM's channel sum cancels below float32's
    # precision on these random-init models: README, "Text-prompted detectors")
    method = 'hirescam'
    if engine.phrases is not None:
        meta = dict(meta, text=' . '.join(engine.phrases), custom_entities=True)
        method = 'gradcam'
    try:
        with torch.no_grad():
            pred = _frame_detector(model).predict(
                inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    except Exception as exc:  # noqa: BLE001
        return dict(status='cannot build', reason=f"mmdet's own predict fails: {_message(exc)}")
    out = dict(adapter=type(engine.adapter).__name__)
    try:
        dets = engine.detect(image)
        # the engine's rule, as documented: model.predict's detections scoring >= score_thr
        # (a random mask-IoU head can make Mask Scoring R-CNN's products negative)
        differs = _same_detections(dets, pred[pred.scores >= engine.score_thr])
        if differs or len(dets) == 0:
            return dict(out, status='error', reason=differs or 'no detections to explain')
        sub = dets.select(torch.tensor(_picked(dets)))
        res = engine.explain(image, methods=method, detections=sub)[method]
        for param in model.parameters():  # grad-cam needs a graph: a frozen part (SoftTeacher's
            param.requires_grad_(True)    # teacher) would give it none; ours needs no parameter
        ref = reference_input_cams(model, inputs, method, res.layers, sub, metainfo=meta)
        model.zero_grad(set_to_none=True)
        diff = float(np.abs(res.input_cams - ref).max())
    except Exception as exc:  # noqa: BLE001
        return dict(out, status='error', reason=f'explain: {_message(exc)}')
    out.update(detections=len(dets), max_diff=diff, blank=bool(np.abs(ref).max() == 0))
    if not np.allclose(res.input_cams, ref, atol=1e-4, rtol=1e-3):
        return dict(out, status='error', reason=f'maps differ from the reference by {diff:.3g}')
    return dict(out, status='explained', reason=None)


def _message(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f'{Path(frame.filename).name}:{frame.lineno}'
    return f'{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ""} ({where})'


def _child(conn, configs: Sequence[str], input_size: int, tries: int = 3) -> None:
    """Check the first config of ``configs`` that can be built here (at most ``tries``)."""
    try:
        for config in configs[:tries]:
            result = dict(check_group(config, input_size), config=config)
            if result['status'] != 'cannot build':
                break
        conn.send(result)
    finally:
        conn.close()


# ----------------------------------------------------------------------------- the run
def run(groups: List[dict], input_size: int, timeout: float, jobs: int) -> None:
    """Check every group without a status, ``jobs`` forked children at a time, each killed
    after ``timeout`` seconds; results are written into the groups."""
    ctx = mp.get_context('fork')
    todo = [g for g in groups if g['status'] is None]
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            group = todo.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(send, group['configs'], input_size))
            proc.start()
            send.close()
            running.append((group, proc, recv, time.monotonic()))
        time.sleep(0.05)
        for item in list(running):
            group, proc, recv, start = item
            elapsed = time.monotonic() - start
            if recv.poll():
                try:
                    group.update(recv.recv())
                except EOFError:
                    group.update(status='error', reason='the child process died')
            elif proc.is_alive() and elapsed < timeout:
                continue
            elif proc.is_alive():
                proc.kill()
                group.update(status='timeout', reason=f'over {timeout:.0f} s')
            else:
                group.update(status='error', reason=f'the child process died ({proc.exitcode})')
            proc.join()
            group['seconds'] = round(elapsed, 1)
            running.remove(item)
            _progress(group)


def _progress(group: dict) -> None:
    sys.stderr.write(f"{group['status']:>12} {group.get('seconds', 0):6.1f}s "
                     f"{group['detector']} {'+'.join(group['heads'])} ({group['config']})"
                     f"{': ' + group['reason'] if group.get('reason') else ''}\n")


def _public(group: dict) -> dict:
    keys = ('detector', 'heads', 'checkpoints', 'det_inst', 'config', 'status', 'reason',
            'adapter', 'detections', 'max_diff', 'blank', 'seconds', 'names')
    return {k: group.get(k) for k in keys if group.get(k) is not None or k == 'reason'}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check and print the table (and write the JSON / README section)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--json', metavar='PATH', help='Write the results as JSON (with '
                        '--only: replace the matching groups of an existing file)')
    parser.add_argument('--write-readme', metavar='FILE', help='Replace the coverage section '
                        'of FILE (between <!-- zoo-coverage:begin/end --> markers), from the '
                        'results')
    parser.add_argument('--only', metavar='PATTERN', help='Only groups whose detector, heads '
                        'or configs match this regular expression')
    parser.add_argument('--input-size', type=int, default=320, help='Test pipeline size '
                        '(DETR-family query selection needs >= 320). Defaults to 320.')
    parser.add_argument('--timeout', type=float, default=240.0,
                        help='Seconds per group before it is killed. Defaults to 240.')
    parser.add_argument('--jobs', type=int, default=1, help='Groups checked at once. '
                        'Defaults to 1.')
    parser.add_argument('--parse-cache', metavar='PATH', help='A JSON file keeping the '
                        "configs' (detector, heads) between runs (parsing them all takes ~1 "
                        'min); delete it after changing the installed packages')
    args = parser.parse_args(argv)

    import mmdet
    import mmdet.models  # noqa: F401  (fill the registry before forking)
    from mmengine.registry import init_default_scope

    from mmdet_cam_hook.adapters.table import coverage_section, coverage_shares, replace_coverage

    init_default_scope('mmdet')
    root = mim_root()
    cache = Path(args.parse_cache) if args.parse_cache else None
    groups = group_checkpoints(root, checkpoints(root), cache)
    pattern = re.compile(args.only) if args.only else None
    if pattern:
        for g in groups:
            text = ' '.join([g['detector'], *g['heads'], *g['configs']])
            if g['status'] is None and not pattern.search(text):
                g['status'] = 'skipped'
    start = time.monotonic()
    run(groups, args.input_size, args.timeout, max(1, args.jobs))
    checked = [g for g in groups if g['status'] != 'skipped']
    data = dict(mmdet=mmdet.__version__, input_size=args.input_size,
                seconds=round(time.monotonic() - start, 1),
                groups=[_public(g) for g in checked])
    if args.json:
        path = Path(args.json)
        if pattern and path.exists():
            old = json.loads(path.read_text(encoding='utf-8'))
            new = {(g['detector'], tuple(g['heads'])): g for g in data['groups']}
            data = dict(old, groups=[new.pop((g['detector'], tuple(g['heads'])), g)
                                     for g in old['groups']] + list(new.values()))
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    sys.stdout.write(coverage_section(data))
    for share, (done, total) in coverage_shares(data).items():
        sys.stdout.write(f'{share}: {done}/{total}\n')
    if args.write_readme:
        readme = Path(args.write_readme)
        readme.write_text(replace_coverage(readme.read_text(encoding='utf-8'), data),
                          encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
