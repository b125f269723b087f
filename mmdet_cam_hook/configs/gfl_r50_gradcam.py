# GFL R50-FPN, GroupNorm head (mmdet's gfl_r50_fpn_1x_coco.py: 1333x800 test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/gfl_r50_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/gfl_r50_gradcam
_base_ = ['mmdet::gfl/gfl_r50_fpn_1x_coco.py', './_base_/gradcam_hook.py']

# mmdet's GFL config registers no custom hooks (tests/test_configs.py checks that it
# still does not); a config inheriting one that does must write
# `custom_hooks = [*_base_.custom_hooks, _base_.gradcam_hook]`.
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
