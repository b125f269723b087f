"""A real headless browser for tests: the OS's Chromium driven by Playwright for Python.

Playwright is used only as a driver: it never downloads a browser of its own here; it starts
the Chromium that the operating system's package installed (``/usr/bin/chromium`` on Debian,
or ``$MMDET_CAM_CHROMIUM``), with flags that keep it quiet on a closed network. The set-up
(``tools/setup_env.sh``) installs both; where either is missing, tests skip with the reason
:func:`browser_unavailable` gives.

Usage in a test::

    from mmdet_cam_hook.testing.browser import open_page, require_browser

    def test_page(tmp_path):
        require_browser()                 # pytest.skip(reason) when there is no browser
        with open_page(tmp_path / 'report.html') as session:
            page = session.page           # a playwright.sync_api.Page, already loaded
            page.click('#thumbs img')
            assert not session.console_errors and not session.network_requests

Nothing in the package imports this module (the import rule's ``testing`` contract).
"""
import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Iterator, List, Optional

#: Chromium's flags for this machine's closed network: no GPU, no QUIC, no first-run UI, and
#: no background connections (component updates, sync, field trials) that the network refuses.
CHROMIUM_FLAGS = (
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
)
#: Where the OS's Chromium is looked for, first match wins (``$MMDET_CAM_CHROMIUM`` before these).
CHROMIUM_CANDIDATES = ('/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome')


def chromium_path() -> Optional[str]:
    """The OS's Chromium executable, or ``None`` when none is installed.

    Returns:
        str | None: ``$MMDET_CAM_CHROMIUM`` when set and executable, else the first of
        :data:`CHROMIUM_CANDIDATES` (or ``chromium`` on ``PATH``) that exists.
    """
    env = os.environ.get('MMDET_CAM_CHROMIUM')
    candidates = ([env] if env else []) + list(CHROMIUM_CANDIDATES)
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which('chromium')


def browser_unavailable() -> Optional[str]:
    """Why no browser test can run here, or ``None`` when one can.

    Returns:
        str | None: a reason naming what is missing and how the set-up installs it.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ('Playwright for Python is not installed (pip install playwright==1.63.0, '
                'the `report` extra; tools/setup_env.sh installs it)')
    if chromium_path() is None:
        return ('no Chromium from the OS packages (looked at $MMDET_CAM_CHROMIUM, '
                f'{", ".join(CHROMIUM_CANDIDATES)} and PATH); tools/setup_env.sh installs '
                'Debian\'s `chromium` when run as root with apt')
    return None


def require_browser() -> None:
    """Skip the calling pytest test with a clear reason when no browser can run here."""
    import pytest

    reason = browser_unavailable()
    if reason is not None:
        pytest.skip(reason)


@dataclasses.dataclass
class PageSession:
    """A loaded page and what it did: console errors, page errors and network requests.

    Attributes:
        page: the Playwright ``Page``.
        console_errors: texts of ``console.error`` messages and uncaught page exceptions.
        network_requests: URLs of every request the page made that was not a ``file://`` or
            ``data:`` URL (each was aborted, so a page that needs the network shows it).
        file_requests: URLs of the ``file://`` requests (the page's own files).
    """

    page: object
    console_errors: List[str] = dataclasses.field(default_factory=list)
    network_requests: List[str] = dataclasses.field(default_factory=list)
    file_requests: List[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def launch_chromium(headless: bool = True) -> Iterator[object]:
    """Start the OS's Chromium through Playwright with :data:`CHROMIUM_FLAGS`.

    Args:
        headless (bool): run without a window. Defaults to True.

    Yields:
        playwright.sync_api.Browser: closed, with Playwright stopped, on exit. Each launch has
        a fresh, empty profile (Playwright makes a temporary ``--user-data-dir``).

    Raises:
        RuntimeError: when no browser can run here (the reason of :func:`browser_unavailable`).
    """
    reason = browser_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=headless,
                                     args=list(CHROMIUM_FLAGS))
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(path, viewport=(1280, 900), timeout_ms: int = 30000,
              browser=None) -> Iterator[PageSession]:
    """Open a local HTML file in headless Chromium, recording errors and requests.

    Every request that is not ``file://`` or ``data:``/``blob:`` is recorded and aborted
    before it leaves, so a test can assert that a page opened from disk needs no network.

    Args:
        path (str | Path): the HTML file.
        viewport (tuple[int, int]): width, height in CSS pixels. Defaults to (1280, 900).
        timeout_ms (int): Playwright's default timeout for the page. Defaults to 30000.
        browser (playwright.sync_api.Browser, optional): A browser of :func:`launch_chromium`
            to open the page in (a fresh context each time). Defaults to None (one is
            launched for this page).

    Yields:
        PageSession: the page after its ``load`` event, with the records so far (they keep
        growing while the test clicks).
    """
    url = Path(path).resolve().as_uri()
    with contextlib.ExitStack() as stack:
        if browser is None:
            browser = stack.enter_context(launch_chromium())
        context = browser.new_context(viewport=dict(width=viewport[0], height=viewport[1]),
                                      accept_downloads=False)
        context.set_default_timeout(timeout_ms)
        page = context.new_page()
        session = PageSession(page=page)

        def _route(route):
            req_url = route.request.url
            if req_url.startswith('file://'):
                session.file_requests.append(req_url)
                route.continue_()
            elif req_url.startswith(('data:', 'blob:')):
                route.continue_()
            else:
                session.network_requests.append(req_url)
                route.abort()

        context.route('**/*', _route)
        page.on('console', lambda msg: msg.type == 'error' and session.console_errors.append(
            msg.text))
        page.on('pageerror', lambda exc: session.console_errors.append(str(exc)))
        page.goto(url, wait_until='load')
        try:
            yield session
        finally:
            context.close()
