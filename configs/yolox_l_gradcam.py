# YOLOX-l (mmdet's yolox_l_8xb8-300e_coco.py: 640 px test input)
# with YOLOXGradCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/yolox_l_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/yolox_l_gradcam
_base_ = 'mmdet::yolox/yolox_l_8xb8-300e_coco.py'

custom_imports = dict(imports=['mmdet_cam_hook'], allow_failed_imports=False)

# Config inheritance replaces lists: `[*_base_.custom_hooks, ...]` keeps YOLOX's mode-switch,
# SyncNorm and EMA hooks, which a plain `custom_hooks = [dict(...)]` would silently drop.
custom_hooks = [
    *_base_.custom_hooks,
    dict(
        type='YOLOXGradCAMHook',
        probe_images=4,  # spread over the val set; its GT boxes enable the pointing game
        interval=1,  # every validation (YOLOX validates every 10 epochs)
        # Grad-CAM: class-level evidence; HiResCAM: element-wise, stays on the instance.
        methods=['gradcam', 'hirescam'],
        target_layers=None,  # each detection on the neck output of its own FPN level
        score_thr=0.3,
        topk=10),
]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
