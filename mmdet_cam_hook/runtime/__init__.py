"""Run an mmdet detector read-only: model state, the batched detector, safe checkpoints, model
building, the test pipeline, image files and a dataset's ground truth. Knows no CAM and no head.
"""
