"""``python -m mmdet_cam_hook.adapters``: print the table of supported detectors, generated from
the adapter registry; ``--write README.md`` puts it between the file's
``<!-- supported-heads:begin -->`` and ``<!-- supported-heads:end -->`` markers."""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import replace_table, supported_table


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the table, or write it into a document.

    Args:
        argv (Sequence[str], optional): Arguments. Defaults to None (``sys.argv[1:]``).

    Returns:
        int: 0, or 2 if the document has no markers.
    """
    parser = argparse.ArgumentParser(prog='python -m mmdet_cam_hook.adapters',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--write', metavar='FILE', default=None,
                        help='Replace the table between the markers of FILE (e.g. README.md)')
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(supported_table())
        return 0
    path = Path(args.write)
    try:
        path.write_text(replace_table(path.read_text(encoding='utf-8')), encoding='utf-8')
    except ValueError as exc:
        sys.stderr.write(f'{path}: {exc}\n')
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
