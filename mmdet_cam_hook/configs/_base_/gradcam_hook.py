# Shared by configs/yolox_*_gradcam.py: import this package (which registers the hook) and the
# hook's settings. Each config adds `_base_.gradcam_hook` to YOLOX's own custom hooks.
custom_imports = dict(imports=['mmdet_cam_hook'], allow_failed_imports=False)

gradcam_hook = dict(
    type='YOLOXGradCAMHook',
    probe_images=4,  # spread over the val set; its GT boxes enable the pointing game
    interval=1,  # every validation (YOLOX validates every 10 epochs)
    # Grad-CAM: class-level evidence; HiResCAM: element-wise, stays on the instance.
    methods=['gradcam', 'hirescam'],
    target_layers=None,  # each detection on the neck output of its own FPN level
    score_thr=0.3,
    topk=10)
