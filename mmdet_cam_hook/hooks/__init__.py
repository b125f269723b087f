"""MMEngine glue: :class:`~mmdet_cam_hook.hooks.cam_hook.DetCAMHook` (one hook per file, as in
mmdet's ``engine/hooks``)."""
