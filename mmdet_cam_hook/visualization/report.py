"""``report.html``: one self-contained page per run that anyone can open from disk.

The page needs no server and makes no network request: its CSS and JavaScript are inline, the
run's :mod:`manifest <.manifest>` is embedded as JSON, and the images are files beside it
(relative paths from the manifest's ``files``). It shows

- a gallery of thumbnails (``loading="lazy"``: a 1,000-image run opens in about a second,
  ``benchmarks/bench_report.py``); a click opens the image's panel: the image, its detections
  (class, score, level, layers), and a click on a detection shows its map for every method
  that was run, side by side;
- a sortable table of every detection (image, class, score, level, method, energy in box and,
  where measured, pointing game, deletion and insertion AUC per protocol);
- for ``mmdet-cam-eval``: the deletion/insertion curves (:func:`.plots.plot_curves`), the
  summary table and the settings.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..runtime.io import write_atomically
from .manifest import json_safe, validate, write_json

__all__ = ['REPORT_NAME', 'MANIFEST_NAME', 'FILES_DIR', 'thumbnail', 'page_html',
           'write_report']

REPORT_NAME = 'report.html'
#: The page may load nothing but its own files: no request can leave the machine.
_CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")
MANIFEST_NAME = 'manifest.json'
#: The folder beside ``report.html`` for the files only the report uses (thumbnails, plots).
FILES_DIR = 'report_files'

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:10px 18px}header h1{font-size:18px;margin:0}
header p{margin:2px 0 0;font-size:12px;color:#cfd8dc}
main{padding:12px 18px}section{margin-bottom:22px}h2{font-size:16px;margin:10px 0}
#gallery{display:flex;flex-wrap:wrap;gap:8px}
.thumb{margin:0;width:168px;cursor:pointer;border:2px solid transparent;background:#fff;
 padding:4px;border-radius:4px;box-shadow:0 1px 2px #0002}
.thumb.active{border-color:#1e88e5}.thumb img{width:160px;height:120px;object-fit:contain;
 background:#eee;display:block}.thumb figcaption{font-size:11px;overflow:hidden;
 white-space:nowrap;text-overflow:ellipsis}
.thumb.empty figcaption{color:#999}
#panel{display:none;background:#fff;padding:10px;border-radius:4px;box-shadow:0 1px 3px #0003}
#panel.open{display:flex;gap:14px;flex-wrap:wrap}#panel-view{max-width:min(640px,100%)}
#panel-view img{width:480px;max-width:100%;display:block}
#detections{list-style:none;padding:0;margin:0;
 min-width:260px}
#detections li{padding:4px 6px;cursor:pointer;border-radius:3px;font-size:13px}
#detections li:hover{background:#e3f2fd}#detections li.active{background:#bbdefb}
#maps{display:flex;gap:10px;flex-wrap:wrap;width:100%}#maps figure{margin:0;max-width:320px}
#maps img{width:320px;max-width:100%;display:block}#maps figcaption{font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#eceff1;cursor:pointer;user-select:none;position:sticky;top:0}
td.s,th.s{text-align:left}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
.note{color:#666;font-size:12px}.curves img{max-width:100%}
"""

_JS = r"""
const M = JSON.parse(document.getElementById('manifest').textContent);
const $ = (id) => document.getElementById(id);
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const fmt = (v, d) => (v === null || v === undefined) ? '-' :
  (typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(d === undefined ? 3 : d))
   : String(v));
const base = (p) => p.split(/[\\/]/).pop();
function detText(d) {
  return '#' + d.index + ' ' + (d['class'] === null ? 'label ' + d.label : d['class']) + ' ' +
    d.score.toFixed(3) + ' \u00b7 level ' + d.level + ' \u00b7 ' + d.layers.join(', ');
}
function metricText(m) {
  if (!m) return '';
  return Object.entries(m).map(([k, v]) => (v !== null && typeof v === 'object') ?
    Object.entries(v).map(([p, x]) => k + ' ' + p + ' ' + fmt(x)).join(', ') :
    k + ' ' + fmt(v)).join(', ');
}
function showDetection(i, k) {
  const img = M.images[i], det = img.detections[k];
  for (const li of $('detections').children) li.classList.toggle('active', +li.dataset.k === k);
  const maps = $('maps');
  maps.replaceChildren();
  for (const method of M.methods) {
    if (!det.files[method]) continue;
    const fig = el('figure', {'class': 'map', 'data-method': method});
    fig.append(el('img', {src: det.files[method], alt: method + ' map of detection ' + k}));
    fig.append(el('figcaption', {}, method + ': ' + metricText(det.metrics[method])));
    maps.append(fig);
  }
  if (!maps.children.length)
    maps.append(el('p', {'class': 'note'}, 'no map file for this detection'));
}
function showImage(i) {
  const img = M.images[i];
  for (const t of $('gallery').children) t.classList.toggle('active', +t.dataset.i === i);
  $('panel').classList.add('open');
  $('panel-title').textContent = img.path + ' (' + img.status.replace('_', ' ') + ')';
  const view = $('panel-view');
  view.replaceChildren();
  const src = img.files.view || img.files.thumbnail;
  if (src) view.append(el('img', {src: src, alt: img.path}));
  const list = $('detections');
  list.replaceChildren();
  img.detections.forEach((d, k) => {
    const li = el('li', {'data-k': k}, detText(d));
    li.addEventListener('click', () => showDetection(i, k));
    list.append(li);
  });
  if (!img.detections.length) list.append(el('li', {'class': 'note'}, 'no detections'));
  $('maps').replaceChildren();
}
function gallery() {
  const g = $('gallery');
  M.images.forEach((img, i) => {
    const fig = el('figure', {'class': 'thumb' + (img.detections.length ? '' : ' empty'),
                              'data-i': i, title: img.path});
    if (img.files.thumbnail)
      fig.append(el('img', {src: img.files.thumbnail, loading: 'lazy', alt: img.path,
                            width: 160, height: 120}));
    fig.append(el('figcaption', {}, base(img.path) + ' \u00b7 ' + img.detections.length + ' det.'));
    fig.addEventListener('click', () => showImage(i));
    g.append(fig);
  });
}
// The table: one row per detection and method.
const ROW_LIMIT = 2000;
let rows = [], columns = [], sortKey = null, sortDir = 1;
function buildRows() {
  const extra = new Set();
  M.images.forEach((img, i) => img.detections.forEach((d, k) => {
    for (const method of M.methods) {
      const m = d.metrics[method] || {};
      const r = {image: base(img.path), i: i, k: k, det: d.index,
                 'class': d['class'] === null ? String(d.label) : d['class'], score: d.score,
                 level: d.level, method: method};
      for (const [name, v] of Object.entries(m)) {
        if (v !== null && typeof v === 'object') {
          for (const [p, x] of Object.entries(v)) {
            r[name + ' ' + p] = x;
            extra.add(name + ' ' + p);
          }
        } else { r[name] = (typeof v === 'boolean') ? +v : v; extra.add(name); }
      }
      rows.push(r);
    }
  }));
  columns = ['image', 'det', 'class', 'score', 'level', 'method', ...extra];
}
const cls = (c) => ['image', 'class', 'method'].includes(c) ? 's' : '';
function renderTable() {
  const t = $('table');
  t.replaceChildren();
  const head = el('tr');
  for (const c of columns) {
    const th = el('th', {'data-key': c, 'class': cls(c)}, c);
    if (c === sortKey) th.setAttribute('aria-sort', sortDir > 0 ? 'ascending' : 'descending');
    th.addEventListener('click', () => {
      sortDir = (sortKey === c) ? -sortDir : 1;
      sortKey = c;
      sortRows();
      renderTable();
    });
    head.append(th);
  }
  const thead = el('thead'); thead.append(head); t.append(thead);
  const body = el('tbody');
  for (const r of rows.slice(0, ROW_LIMIT)) {
    const tr = el('tr', {'data-i': r.i, 'data-k': r.k});
    for (const c of columns) tr.append(el('td', {'class': cls(c)}, fmt(r[c])));
    tr.addEventListener('click', () => {
      showImage(r.i);
      showDetection(r.i, r.k);
      $('panel').scrollIntoView();
    });
    body.append(tr);
  }
  t.append(body);
  $('table-note').textContent = rows.length > ROW_LIMIT ?
    'showing ' + ROW_LIMIT + ' of ' + rows.length + ' rows (sort to see others)' :
    rows.length + ' rows';
}
function sortRows() {
  const k = sortKey;
  rows.sort((a, b) => {
    const x = a[k], y = b[k];
    const nx = x === null || x === undefined, ny = y === null || y === undefined;
    if (nx || ny) return nx - ny;  // missing values last, whichever the direction
    return (typeof x === 'number' ? x - y : String(x).localeCompare(String(y))) * sortDir;
  });
}
function keyValues(id, obj) {
  const t = $(id);
  if (!t) return;
  for (const [k, v] of Object.entries(obj || {})) {
    const tr = el('tr');
    tr.append(el('th', {'class': 's'}, k));
    const text = (v !== null && typeof v === 'object') ? JSON.stringify(v) : fmt(v);
    tr.append(el('td', {'class': 's'}, text));
    t.append(tr);
  }
}
gallery();
buildRows();
renderTable();
keyValues('settings', Object.assign({config: M.config, checkpoint: M.checkpoint,
  checkpoint_sha256: M.checkpoint_sha256, methods: M.methods, layers: M.layers,
  seed: M.seed}, M.thresholds, M.settings));
keyValues('versions', M.versions);
document.body.dataset.ready = '1';
"""


def thumbnail(image: np.ndarray, side: int = 160, enlarge: bool = False) -> np.ndarray:
    """``image`` shrunk so that its longer side is at most ``side`` pixels.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR.
        side (int): The longer side's maximum. Defaults to 160.
        enlarge (bool): Also enlarge a smaller image to ``side`` (nearest pixel), so that
            boxes and labels drawn on it stay legible. Defaults to False.

    Returns:
        np.ndarray: The thumbnail (``image`` itself when it already fits).
    """
    import cv2

    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale == 1 or (scale > 1 and not enlarge):
        return image
    if scale > 1:
        size = (round(width * scale), round(height * scale))
        return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _summary_table(summary: Optional[Mapping]) -> str:
    """The eval summary ``{method: numbers}`` as an HTML table (nested dicts: a column each)."""
    if not summary:
        return ''
    columns: list = []
    flat = {}
    for method, numbers in summary.items():
        row = {}
        for name, value in numbers.items():
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            for sub, v in items:
                key = name if sub is None else f'{name} {sub}'
                row[key] = v
                if key not in columns:
                    columns.append(key)
        flat[method] = row

    def cell(v):
        return '-' if v is None else (f'{v:.3f}' if isinstance(v, float) else html.escape(str(v)))

    head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
    body = ''.join(f'<tr><td class="s">{html.escape(m)}</td>'
                   + ''.join(f'<td>{cell(row.get(c))}</td>' for c in columns) + '</tr>'
                   for m, row in flat.items())
    return (f'<h3>Summary</h3><table id="summary"><thead><tr><th class="s">method</th>{head}'
            f'</tr></thead><tbody>{body}</tbody></table>')


def page_html(manifest: Mapping) -> str:
    """The page of a run: :data:`_CSS`, :data:`_JS` and the manifest, in one string.

    Args:
        manifest (Mapping): A manifest that fits :data:`~.manifest.MANIFEST_SCHEMA`.

    Returns:
        str: The HTML document.
    """
    data = json.dumps(json_safe(manifest), allow_nan=False, separators=(',', ':'))
    data = data.replace('</', '<\\/')  # nothing in the data can close the <script> element
    title = f'{manifest["tool"]} report: {len(manifest["images"])} image(s), ' \
            f'{", ".join(manifest["methods"])}'
    curves = ''.join(
        f'<figure><img src="{html.escape(path)}" alt="{html.escape(name)}">'
        f'<figcaption>{html.escape(name)}</figcaption></figure>'
        for name, path in manifest['files'].items() if name.startswith('curves'))
    evaluation = ''
    if curves or manifest.get('summary'):
        evaluation = (f'<section id="evaluation"><h2>Faithfulness and localisation</h2>'
                      f'<div class="curves">{curves}</div>'
                      f'{_summary_table(manifest.get("summary"))}</section>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<p>{html.escape(manifest['config'])} &middot; {html.escape(manifest['checkpoint'])} &middot;
mmdet-cam-hook {html.escape(manifest['versions'].get('mmdet-cam-hook', '?'))}</p></header>
<main>
<section><h2>Images</h2><div id="gallery"></div></section>
<section><div id="panel"><div id="panel-view"></div><div><h3 id="panel-title"></h3>
<ul id="detections"></ul></div><div id="maps"></div></div></section>
{evaluation}
<section><h2>Detections</h2><p id="table-note" class="note"></p><table id="table"></table>
</section>
<section><h2>Settings</h2><table id="settings"></table><h3>Versions</h3>
<table id="versions"></table></section>
</main>
<script type="application/json" id="manifest">{data}</script>
<script>{_JS}</script>
</body></html>
"""


def write_report(folder, manifest: Mapping) -> tuple[Path, Path]:
    """Validate ``manifest`` and write ``manifest.json`` and ``report.html`` into ``folder``,
    each atomically (the files it names must already be there).

    Args:
        folder (str | Path): The report's folder (created if missing).
        manifest (Mapping): The run's manifest (:mod:`.manifest`).

    Returns:
        tuple[Path, Path]: The paths of ``report.html`` and ``manifest.json``.

    Raises:
        ValueError: If the manifest does not fit :data:`~.manifest.MANIFEST_SCHEMA`.
        OSError: If a file cannot be written.
    """
    manifest = json_safe(manifest)
    validate(manifest)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = write_json(folder / MANIFEST_NAME, manifest)
    text = page_html(manifest)
    page = write_atomically(folder / REPORT_NAME,
                            lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return page, manifest_path
