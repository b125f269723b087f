# Cascade R-CNN R50-FPN (mmdet's cascade-rcnn_r50_fpn_1x_coco.py: 1333x800 keep-ratio test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every validation, in
# TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/. A detection is a
# kept (RoI, class) pair, its score the RoI head's class probability; each one is explained on
# the FPN output its RoI was pooled from (neck.fpn_convs.l, by the RoI extractor's own rule).
# A score is the class probability of the mean of the 3 stages' logits, each stage on its own
# RoI; the stages may pool one detection from several FPN levels, so each map is taken on the
# level of its last-stage RoI, by the exact route (one backward per detection).
#   python tools/train.py configs/cascade-rcnn_r50_fpn_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/cascade-rcnn_r50_fpn_gradcam
# ruff: noqa: N999  (a config named like mmdet's, with hyphens; never imported as a module)
_base_ = ['mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', './_base_/gradcam_hook.py']

# mmdet's config has no custom hooks of its own (config inheritance replaces lists: with a base
# that has some, write `[*_base_.custom_hooks, _base_.gradcam_hook]`).
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
