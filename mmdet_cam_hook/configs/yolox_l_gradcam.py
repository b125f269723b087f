# YOLOX-l (mmdet's yolox_l_8xb8-300e_coco.py: 640 px test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/yolox_l_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/yolox_l_gradcam
_base_ = ['mmdet::yolox/yolox_l_8xb8-300e_coco.py', './_base_/gradcam_hook.py']

# Config inheritance replaces lists: `[*_base_.custom_hooks, ...]` keeps YOLOX's mode-switch,
# SyncNorm and EMA hooks, which a plain `custom_hooks = [dict(...)]` would silently drop.
custom_hooks = [*_base_.custom_hooks, _base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
