# DINO-4scale R50 (mmdet's dino-4scale_r50_8xb2-12e_coco.py: 1333x800 keep-ratio test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every validation, in
# TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/. A detection is a
# kept (query, class) pair, its score the sigmoid of that query's class logit at the last
# decoder layer. The encoder mixes every level, so each detection is explained on all four
# neck outputs together (neck.convs.0-2, neck.extra_convs.0, maps averaged), by one backward
# through the transformer per detection (the exact route).
#   python tools/train.py configs/dino-4scale_r50_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/dino-4scale_r50_gradcam
# ruff: noqa: N999  (a config named like mmdet's, with hyphens; never imported as a module)
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', './_base_/gradcam_hook.py']

# mmdet's config has no custom hooks of its own (config inheritance replaces lists: with a base
# that has some, write `[*_base_.custom_hooks, _base_.gradcam_hook]`).
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
