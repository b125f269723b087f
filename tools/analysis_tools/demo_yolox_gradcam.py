"""Per-detection Grad-CAM for MMDetection YOLOX: the seed tool's command, kept for its users.

Same as the ``mmdet-cam`` console script (see ``mmdet-cam --help``)::

    python tools/analysis_tools/demo_yolox_gradcam.py CONFIG CHECKPOINT IMG [options]
"""
import sys

from mmdet_cam_hook.cli.cam import main

if __name__ == '__main__':
    sys.exit(main())
