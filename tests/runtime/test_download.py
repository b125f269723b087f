"""A download is cached only when complete: the Content-Length the server announced, the sha256
prefix the file name carries; a body cut short is a clear error and leaves nothing behind.
A loopback HTTP server in a thread stands in for the checkpoint host."""
import hashlib
import http.server
import io
import threading

import pytest
import torch

from mmdet_cam_hook.runtime.checkpoint import (
    CheckpointError,
    download,
    hash_prefix,
    load_checkpoint,
    url_cache_dir,
)


def _checkpoint_bytes(value: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    torch.save({'state_dict': {'w': torch.full((64, ), value)}}, buffer)
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback server; ``routes[path] = (body, mode)`` with mode 'full', 'short' (a longer
    Content-Length than the body, then the connection closes) or 'chunked-short' (a chunked
    body whose last chunk is cut)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            body, mode = routes[self.path]
            self.send_response(200)
            if mode == 'chunked-short':
                self.send_header('Transfer-Encoding', 'chunked')
                self.end_headers()
                half = body[:len(body) // 2]
                self.wfile.write(b'%x\r\n%s\r\n' % (len(half), half))
                self.wfile.write(b'%x\r\n%s' % (len(body) - len(half), body[len(half):][:10]))
            else:
                extra = 1000 if mode == 'short' else 0
                self.send_header('Content-Length', str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05, ), daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}', routes, hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def _cached_files(url):
    folder = url_cache_dir(url)
    return [p.name for p in folder.rglob('*') if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize('mode, match', [
    ('short', r'cut short: \d+ of \d+ bytes; try again'),
    ('chunked-short', 'cut short.*connection closed; try again'),
])
def test_truncated_download_is_not_cached(server, mode, match):
    base, routes, hits = server
    url = f'{base}/ckpts/model.pth'
    body = _checkpoint_bytes(2.0)
    routes['/ckpts/model.pth'] = (body, mode)
    for _ in range(2):  # refused each time: nothing was cached as complete
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(url)
        assert 'nothing was cached' in str(info.value) and url in str(info.value)
        assert _cached_files(url) == [], 'no partial file left'
    assert len(hits) == 2
    routes['/ckpts/model.pth'] = (body, 'full')  # the server recovers: the file is fetched
    assert load_checkpoint(url)['state_dict']['w'][0].item() == 2.0
    assert _cached_files(url) == ['model.pth']


def test_hash_prefix_in_the_file_name_is_checked(server):
    base, routes, _ = server
    body = _checkpoint_bytes(3.0)
    digest = hashlib.sha256(body).hexdigest()
    wrong = 'abcdef12' if not digest.startswith('abcdef12') else '12abcdef'
    bad = f'{base}/yolox_s_8x8_300e_coco_20211121_095711-{wrong}.pth'
    routes[bad[len(base):]] = (body, 'full')
    with pytest.raises(CheckpointError, match=f'sha256 starts with {digest[:8]}.*says {wrong}'):
        download(bad)
    assert _cached_files(bad) == []
    good = f'{base}/yolox_s_8x8_300e_coco_20211121_095711-{digest[:8]}.pth'
    routes[good[len(base):]] = (body, 'full')
    assert download(good).read_bytes() == body


@pytest.mark.parametrize('name, prefix', [
    ('yolox_s_8x8_300e_coco_20211121_095711-4592a793.pth', '4592a793'),
    ('resnet50-0676ba61.pth', '0676ba61'),
    ('model_20240101-12345678.pth', None),  # all digits: a date or a step, not a hash
    ('faster-rcnn_r50.pth', None),
    ('epoch_12.pth', None),
    ('a-beef.pth', None),  # fewer than 8 hex digits
])
def test_hash_prefix_of_names(name, prefix):
    assert hash_prefix(name) == prefix
