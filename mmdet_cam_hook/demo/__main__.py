"""``python -m mmdet_cam_hook.demo``: see :mod:`mmdet_cam_hook.demo.run`."""
from .run import main

if __name__ == '__main__':
    raise SystemExit(main())
