"""From activations to a map on the image: the engine, its gradient routes, the methods and
their maths, the geometry and the target layers. Knows no runner and no head (those are
:mod:`mmdet_cam_hook.adapters`)."""
