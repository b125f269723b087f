"""``python -m mmdet_cam_hook.cli`` (and ``torchrun ... -m mmdet_cam_hook.cli``): ``mmdet-cam``."""
from .cam import main

if __name__ == '__main__':
    raise SystemExit(main())
