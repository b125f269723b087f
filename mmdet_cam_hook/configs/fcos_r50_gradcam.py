# FCOS R50-caffe-FPN, GroupNorm head (mmdet's fcos_r50-caffe_fpn_gn-head_1x_coco.py: 1333x800)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/fcos_r50_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/fcos_r50_gradcam
_base_ = ['mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', './_base_/gradcam_hook.py']

# mmdet's FCOS config registers no custom hooks (tests/test_configs.py checks that it
# still does not); a config inheriting one that does must write
# `custom_hooks = [*_base_.custom_hooks, _base_.gradcam_hook]`.
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
