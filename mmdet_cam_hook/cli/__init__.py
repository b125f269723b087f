"""The command-line tools: ``mmdet-cam`` (:mod:`.cam`) and ``mmdet-cam-eval`` (:mod:`.eval`).

What they share (console logging, exit codes, device and config arguments, model and engine)
is :mod:`.common`'s; the files ``mmdet-cam`` writes and their naming rules :mod:`.outputs`'; its
images :mod:`.folder`'s and what becomes of each :mod:`.explaining`'s; torchrun
:mod:`.distributed`'s.

``torchrun -m mmdet_cam_hook.cli`` runs ``mmdet-cam`` and ``torchrun -m mmdet_cam_hook.cli.eval``
runs ``mmdet-cam-eval`` (torchrun takes a module, not a console script).
"""
