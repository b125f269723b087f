# RTMDet-s (mmdet's rtmdet_s_8xb32-300e_coco.py: 640 px test input, letterboxed)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/rtmdet_s_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/rtmdet_s_gradcam
_base_ = ['mmdet::rtmdet/rtmdet_s_8xb32-300e_coco.py', './_base_/gradcam_hook.py']

# Config inheritance replaces lists: `[*_base_.custom_hooks, ...]` keeps RTMDet's EMA and
# pipeline-switch hooks, which a plain `custom_hooks = [dict(...)]` would silently drop.
custom_hooks = [*_base_.custom_hooks, _base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
