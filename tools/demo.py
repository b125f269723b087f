"""Train a small detector on the built-in shapes dataset with DetCAMHook and show the results.

The README's ``make demo`` runs this; it is the same as ``python -m mmdet_cam_hook.demo``.
``--model yolox-nano`` (the default), ``--model rtmdet-tiny`` or ``--model rtmdet-ins-tiny``
(instance masks: a class map and a mask map per detection) picks the detector
(``make demo ARGS="--model rtmdet-ins-tiny"``); run ``python tools/demo.py --help`` for the other
options (``--epochs``, ``--num-train``, ``--threads``, ...).
"""
from mmdet_cam_hook.demo.run import main

if __name__ == '__main__':
    raise SystemExit(main())
