# RetinaNet R50-FPN (mmdet's retinanet_r50_fpn_1x_coco.py: 1333x800 keep-ratio test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/retinanet_r50_fpn_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/retinanet_r50_fpn_gradcam
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/gradcam_hook.py']

# mmdet's RetinaNet config registers no custom hooks (tests/test_configs.py checks that it
# still does not); a config inheriting one that does must write
# `custom_hooks = [*_base_.custom_hooks, _base_.gradcam_hook]`.
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
