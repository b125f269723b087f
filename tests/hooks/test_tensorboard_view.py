"""issue 24: the hook's images read in TensorBoard's default view, measured in a real browser.

A short real run (YOLOX-nano, 2 epochs on the 96 px shapes, a validation after each) writes
TensorBoard events; the installed ``tensorboard`` serves them on the loopback interface and the
OS's Chromium (headless, driven by Playwright, no network beyond 127.0.0.1) opens the Images
tab at the issue's 1400x1000 window with no setting changed. From the DOM: every card is shown
at least 150 px wide, and its caption letters, drawn :data:`CARD_LABEL_PX` tall on a
:data:`CARD_WIDTH` wide card, are at least 9 px tall at the displayed width. A screenshot is
saved in the test's folder (the README's picture is one).

Skips, naming what is missing, without Playwright, Chromium or the ``tensorboard`` command.
"""
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from mmengine.runner import Runner

from mmdet_cam_hook.demo.shapes import generate_shapes
from mmdet_cam_hook.testing import TINY_SIZE, cam_hook, run_log_dir, tiny_cfg
from mmdet_cam_hook.testing.browser import browser_unavailable, launch_chromium
from mmdet_cam_hook.visualization.cards import CARD_LABEL_PX, CARD_WIDTH

WINDOW = {'width': 1400, 'height': 1000}  # the window
MIN_DISPLAYED_WIDTH = 150
MIN_LABEL_PX = 9
TIMEOUT = 60  # seconds, for TensorBoard to serve the run and for the page to show it


def _tensorboard() -> str:
    path = Path(sys.executable).parent / 'tensorboard'
    return str(path) if path.exists() else (shutil.which('tensorboard') or '')


def _missing() -> str:
    reason = browser_unavailable()
    if reason:
        return reason
    if not _tensorboard():
        return 'the `tensorboard` command is not installed (pip install tensorboard)'
    return ''


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """The events of a 2-epoch run with the hook on two dataset probes (GT known)."""
    if _missing():
        pytest.skip(_missing())
    root = tmp_path_factory.mktemp('tb_view')
    data = generate_shapes(root / 'shapes', num_train=4, num_val=2, image_size=TINY_SIZE,
                           seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: see conftest.one_thread
    try:
        cfg = tiny_cfg(data, root / 'work', hooks=[cam_hook(methods='gradcam')],
                       backends=('LocalVisBackend', 'TensorboardVisBackend'))
        runner = Runner.from_cfg(cfg)
        runner.train()
    finally:
        torch.set_num_threads(threads)
    return run_log_dir(runner) / 'vis_data'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def serve_tensorboard(logdir: Path, log_file: Path):
    """``tensorboard --logdir`` on 127.0.0.1, yielded once its images plugin lists the run's
    tags (bounded wait); always stopped (by its own pid) on exit."""
    port = _free_port()
    url = f'http://127.0.0.1:{port}'
    with open(log_file, 'wb') as log:
        proc = subprocess.Popen([_tensorboard(), '--logdir', str(logdir), '--host', '127.0.0.1',
                                 '--port', str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    tags = _get_json(f'{url}/data/plugin/images/tags')
                    if any(tags.values()):
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f'TensorBoard did not serve {logdir} within {TIMEOUT} s: '
                                + log_file.read_text(errors='replace')[-2000:])
                time.sleep(0.5)
            yield url, tags
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_IMAGES_JS = """() => {
  const out = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'IMG' && el.src.includes('/individualImage')) {
        const r = el.getBoundingClientRect();
        out.push({src: el.src, natural: el.naturalWidth, width: r.width, height: r.height});
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return out;
}"""


def _tag_of(src: str) -> str:
    """The tag of an image URL: its ``blob_key`` is base64url JSON ``[..., run, tag, ...]``."""
    key = urllib.parse.parse_qs(urllib.parse.urlparse(src).query)['blob_key'][0]
    return json.loads(base64.urlsafe_b64decode(key + '=' * (-len(key) % 4)))[2]


def _images_tab(url: str, screenshot: Path, count: int) -> list:
    """Open the Images tab as a new user would (the OS's Chromium, a fresh profile); wait
    until ``count`` images have loaded."""
    with launch_chromium() as browser:
        context = browser.new_context(viewport=WINDOW)
        try:
            page = context.new_page()
            page.goto(f'{url}/#images', timeout=TIMEOUT * 1000)
            page.wait_for_function(
                f'() => ({_IMAGES_JS})().filter(i => i.natural > 0).length >= {count}',
                timeout=TIMEOUT * 1000)
            page.screenshot(path=str(screenshot))
            return page.evaluate(_IMAGES_JS)
        finally:
            context.close()


def test_cards_read_in_tensorboards_default_view(run_dir, tmp_path):
    with serve_tensorboard(run_dir.parent.parent, tmp_path / 'tensorboard.log') as (url, tags):
        (run, ) = tags
        names = sorted(tags[run])
        # one group per probe and method, its overview and one card per detection (topk=3)
        groups = {n.split('/')[0] for n in names}
        assert len(groups) == 2 and len(names) == 2 * 4, names
        assert all(f'{g}/all' in names for g in groups)
        # the step slider walks through both validations of each overview
        for group in groups:
            query = urllib.parse.urlencode({'run': run, 'tag': f'{group}/all'})
            steps = [e['step'] for e in _get_json(f'{url}/data/plugin/images/images?{query}')]
            assert steps == [1, 2]
        shown = _images_tab(url, tmp_path / 'images_tab.png', len(names))
    assert (tmp_path / 'images_tab.png').stat().st_size > 10_000
    by_tag = {_tag_of(image['src']): image for image in shown}
    assert sorted(by_tag) == names  # every card is on the page, none twice
    for tag, image in by_tag.items():
        assert image['natural'] == CARD_WIDTH, tag
        assert image['width'] >= MIN_DISPLAYED_WIDTH, (tag, image)
        label_px = CARD_LABEL_PX * image['width'] / image['natural']
        assert label_px >= MIN_LABEL_PX, (tag, image, label_px)
