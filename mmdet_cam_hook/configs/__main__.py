"""``python -m mmdet_cam_hook.configs``: print where the shipped configs are."""
import sys

from . import CONFIG_DIR, config_path, list_configs


def main() -> int:
    """Print the config folder, each config's absolute path and a ``_base_`` example.

    Returns:
        int: 0.
    """
    names = list_configs()
    lines = [f'# configs shipped with mmdet_cam_hook, in {CONFIG_DIR}']
    lines += [config_path(name) for name in names]
    lines += ['# inherit one in your config with, e.g.:',
              f'#   _base_ = {config_path("yolox_s_gradcam.py")!r}',
              '# mmdet-cam and python -m mmdet_cam_hook.demo also take '
              "'mmdet_cam_hook::yolox_s_gradcam.py'"]
    sys.stdout.write('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
