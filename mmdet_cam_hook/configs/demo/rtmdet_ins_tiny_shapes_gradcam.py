# The demo with instance masks: an RTMDet-Ins-tiny trained from scratch on the built-in shapes
# dataset (whose annotations hold each shape's exact mask as RLE), on CPU, with DetCAMHook
# logging, for fixed validation images at every validation, each detection's class map and its
# mask map (the evidence for its own predicted mask), with the instance's mask outline on its
# tiles and the `mask_energy_in_mask` scalar.
#
# Run it with `python -m mmdet_cam_hook.demo --model rtmdet-ins-tiny` (or
# `make demo ARGS="--model rtmdet-ins-tiny"`). Changes from stock RTMDet-Ins-tiny, all for a
# short CPU run, as in the RTMDet-tiny demo (`rtmdet_tiny_shapes_gradcam.py`):
# - 3 classes, 192 px (the 256 px images letterboxed down: RTMDet-Ins costs ~1.8x RTMDet-tiny
#   a step on CPU, and 192 px brings it back to about RTMDet-tiny's 256 px), batch 8, 2 data
#   workers, no pretrained backbone (nothing is downloaded);
# - masks loaded as bitmaps (`poly2mask=True`, mmdet's default: the RLE decodes to exactly the
#   drawn pixels; stock RTMDet-Ins keeps COCO's polygons with `poly2mask=False`);
# - no CachedMosaic, RandomResize/RandomCrop or CachedMixUp; HSV jitter and flip stay; images
#   are letterboxed to 192x192 as in RTMDet's test pipeline;
# - a short schedule, 8 epochs: AdamW at RTMDet's lr, a linear warm-up over the first epoch,
#   then cosine to the end; RTMDet's EMAHook and PipelineSwitchHook are kept (the switch for
#   the last epoch).
#   `python -m mmdet_cam_hook.demo --model rtmdet-ins-tiny --epochs N` rescales these numbers.
_base_ = 'mmdet::rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py'

custom_imports = dict(imports=['mmdet_cam_hook'], allow_failed_imports=False)

img_scale = (192, 192)  # width, height
classes = ('square', 'circle', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 120, 255), (0, 170, 0)])
data_root = 'data/shapes/'
dataset_type = 'CocoDataset'

max_epochs = 8
stage2_num_epochs = 1
val_interval = 2
base_lr = 0.004

model = dict(
    backbone=dict(init_cfg=None),  # no ImageNet download; trained from scratch
    bbox_head=dict(num_classes=len(classes)),
    # At most 100 detections, as in the RTMDet-tiny demo: RTMDet-Ins decodes a full-size mask
    # for every kept detection, and the stock 300 cost more than the rest of a CPU validation.
    test_cfg=dict(nms_pre=1000, max_per_img=100),
)

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1, 1), keep_empty=False),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]

train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    pin_memory=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=False, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
# bbox and segm, as RTMDet-Ins: the shapes' RLE masks are the segm ground truth
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=max_epochs, val_interval=val_interval, dynamic_intervals=None)
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0e-3, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=1, T_max=max_epochs - 1,
         end=max_epochs, by_epoch=True, convert_to_iter_based=True),
]

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=val_interval, max_keep_ckpts=1),
)

# Keep RTMDet's own hooks (EMA, pipeline switch): a plain `custom_hooks = [...]` would replace
# the inherited list and silently drop them. Only the switch is adapted to the short schedule.
custom_hooks = [
    *[dict(hook, switch_epoch=max_epochs - stage2_num_epochs, switch_pipeline=train_pipeline)
      if hook['type'] == 'PipelineSwitchHook' else hook for hook in _base_.custom_hooks],
    dict(
        type='DetCAMHook',
        # Fixed images of the validation split, given by index: their ground-truth boxes are
        # known, so the pointing game is logged next to the maps.
        probe_images=[0, 1, 2, 3, 4, 5, 6, 7],
        interval=1,
        # Grad-CAM averages the gradient over the map (class-specific, may light up another
        # object of the same class); HiResCAM keeps it element-wise (stays on the instance).
        # Each method gives a class map and a mask map per detection.
        methods=['gradcam', 'hirescam'],
        score_thr=0.3,
        topk=4),
]

# No name: the runner names it after the run, so two runs in one process do not share one.
visualizer = dict(
    _delete_=True,
    type='DetLocalVisualizer',
    vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])

randomness = dict(seed=0)
auto_scale_lr = dict(enable=False)
