"""The demo: train a small detector on generated shapes with the hook (:mod:`.run`), and the
shapes data set itself (:mod:`.shapes`). ``python -m mmdet_cam_hook.demo`` runs it."""
