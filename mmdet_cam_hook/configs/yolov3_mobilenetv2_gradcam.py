# YOLOv3 MobileNetV2 (mmdet's yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py: 416 px test input)
# with DetCAMHook: per-detection CAMs of 4 fixed validation images after every
# validation, in TensorBoard and as PNGs under <work_dir>/<timestamp>/vis_data/vis_image/.
#   python tools/train.py configs/yolov3_mobilenetv2_gradcam.py    (mmdet's tools/train.py)
#   tensorboard --logdir work_dirs/yolov3_mobilenetv2_gradcam
_base_ = ['mmdet::yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py', './_base_/gradcam_hook.py']

# mmdet's YOLOv3 config registers no custom hooks (tests/test_configs.py checks that it
# still does not); a config inheriting one that does must write
# `custom_hooks = [*_base_.custom_hooks, _base_.gradcam_hook]`.
custom_hooks = [_base_.gradcam_hook]

visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
