"""The command-line tools: ``mmdet-cam`` (:mod:`.cam`) and ``mmdet-cam-eval`` (:mod:`.eval`).

``torchrun -m mmdet_cam_hook.cli`` runs ``mmdet-cam`` and ``torchrun -m mmdet_cam_hook.cli.eval``
runs ``mmdet-cam-eval`` (torchrun takes a module, not a console script).
"""
