"""Train a YOLOX-nano on the built-in shapes dataset with YOLOXGradCAMHook and show the results.

The README's ``make demo`` runs this; it is the same as ``python -m mmdet_cam_hook.demo``.
Run ``python tools/demo.py --help`` for the options (``--epochs``, ``--num-train``, ...).
"""
from mmdet_cam_hook.demo import main

if __name__ == '__main__':
    raise SystemExit(main())
