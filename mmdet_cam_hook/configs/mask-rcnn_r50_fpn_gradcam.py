# Mask R-CNN R50-FPN (mmdet's mask-rcnn_r50_fpn_1x_coco.py: 1333x800 keep-ratio test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every validation, in
# TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/. A detection is a
# kept (RoI, class) pair, its score the RoI head's class probability; each one is explained on
# the FPN output its RoI was pooled from (neck.fpn_convs.l, by the RoI extractor's own rule).
# Scores and maps are the box branch's (the mask branch does not change the boxes).
#   python tools/train.py configs/mask-rcnn_r50_fpn_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/mask-rcnn_r50_fpn_gradcam
# ruff: noqa: N999  (a config named like mmdet's, with hyphens; never imported as a module)
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/gradcam_hook.py']

# mmdet's config has no custom hooks of its own (config inheritance replaces lists: with a base
# that has some, write `[*_base_.custom_hooks, _base_.gradcam_hook]`).
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
