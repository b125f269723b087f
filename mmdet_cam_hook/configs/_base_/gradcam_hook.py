# Shared by the configs/*_gradcam.py (YOLOX, RTMDet, RetinaNet, FCOS, ATSS, GFL, YOLOv3): import
# this package (which registers the hook) and the hook's settings. Each config adds
# `_base_.gradcam_hook` to its mmdet base config's own custom hooks (when it has any).
custom_imports = dict(imports=['mmdet_cam_hook'], allow_failed_imports=False)

gradcam_hook = dict(
    type='DetCAMHook',
    probe_images=4,  # spread over the val set; its GT boxes enable the pointing game
    interval=1,  # every validation (YOLOX and RTMDet validate every 10 epochs, others every 1)
    # Grad-CAM: class-level evidence; HiResCAM: element-wise, stays on the instance.
    methods=['gradcam', 'hirescam'],
    target_layers=None,  # each detection on the feature map of its own FPN level
    score_thr=0.3,
    topk=10)
