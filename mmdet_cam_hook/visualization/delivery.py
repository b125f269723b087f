"""Delivery of the hook's panels and scalars to each backend of MMEngine's visualizer, on its
own: the one place in the package that bypasses MMEngine's backend API.

Why: ``Visualizer.add_image`` loops over the backends itself, so one failing backend (an
unwritable ``vis_image`` folder, a broken tracker) would cost every backend's copy or stop the
run; and each backend encodes the panel again (LocalVisBackend with ``cv2.imwrite``,
TensorBoard with PIL, about 2x slower than OpenCV). Here each backend gets each item on its
own, and each panel is encoded as PNG at most once.

What it costs: it reads MMEngine internals that are not public API, each named where it is
used: ``Visualizer._vis_backends`` (the backends by name), ``LocalVisBackend``'s
``_img_save_dir`` (the folder its ``add_image`` writes to) and, for TensorBoard, torch's
``SummaryWriter.file_writer`` (public in torch, not in MMEngine). A change there in MMEngine
needs a change here; the hook's tests read the files and TensorBoard events back, so such a
change fails them rather than losing panels silently.
"""
import os
import os.path as osp
from typing import Dict, List, Optional

import cv2
import numpy as np
from mmengine.visualization import LocalVisBackend, MLflowVisBackend, TensorboardVisBackend


class Panel:
    """One rendered panel, converted at most once into each form the backends take: RGB pixels
    (MMEngine's ``add_image``) and PNG bytes (files and TensorBoard events).

    Args:
        bgr (np.ndarray): The panel, ``(H, W, 3)`` uint8 BGR, as
            :func:`.render.render_panel` draws it.
    """

    def __init__(self, bgr: np.ndarray) -> None:
        self.bgr = bgr
        self._rgb: Optional[np.ndarray] = None
        self._png: Optional[bytes] = None

    @property
    def rgb(self) -> np.ndarray:
        """The panel as RGB, the format of MMEngine's ``add_image``."""
        if self._rgb is None:
            self._rgb = cv2.cvtColor(self.bgr, cv2.COLOR_BGR2RGB)
        return self._rgb

    @property
    def png(self) -> bytes:
        """The panel encoded as PNG once, with OpenCV's defaults (what ``LocalVisBackend``'s
        ``cv2.imwrite`` writes)."""
        if self._png is None:
            ok, buffer = cv2.imencode('.png', self.bgr)
            if not ok:
                raise ValueError(f'cv2.imencode could not encode a {self.bgr.shape} panel')
            self._png = buffer.tobytes()
        return self._png


class Delivery:
    """Sends images and scalars to each of a visualizer's backends on its own, so that one
    failing backend costs only its own copy, and records what each one lost.

    Each panel is encoded as PNG once for the backends that store PNGs: ``LocalVisBackend``
    gets the bytes written to the file its ``add_image`` would write (``vis_image/{name}_
    {step}.png``), and a ``TensorboardVisBackend`` on torch's ``SummaryWriter`` gets them as
    the image summary its ``add_image`` would build, through the writer's public
    ``file_writer.add_summary`` (``add_image`` would encode again, with PIL, about 2x slower
    than OpenCV). The other backends (W&B, MLflow, any other) get ``add_image`` with RGB pixels.
    :meth:`add_views` sends the full panel to ``LocalVisBackend`` only and the cards, drawn
    for a ~330 px display, to the others.
    MLflow uses an image's name as the artifact file name, needs an extension and ignores
    ``step``, so MLflow backends get ``{name}_{step}.png``. ``LocalVisBackend``'s own
    ``cv2.imwrite`` fails silently (unwritable folder, full disk); the bytes written here raise
    instead, and the loss names the file.

    Args:
        visualizer (Visualizer): The runner's visualizer.
        strict (bool): Raise a backend's error instead of recording it. Defaults to False.

    Attributes:
        sent (dict[str, int]): Items sent, per backend name.
        lost (dict[str, list[str]]): What each backend lost, with the reason.
    """

    def __init__(self, visualizer, strict: bool = False) -> None:
        self.strict = strict
        # MMEngine has no public mapping of the backends (only get_backend by one name)
        self.backends = dict(getattr(visualizer, '_vis_backends', {}))
        self.sent: Dict[str, int] = {name: 0 for name in self.backends}
        self.lost: Dict[str, List[str]] = {}

    def add_image(self, name: str, image: np.ndarray, step: int) -> None:
        """Send one panel to every backend.

        Args:
            name (str): The image name (no ``/``).
            image (np.ndarray): The panel, ``(H, W, 3)`` uint8 **BGR**.
            step (int): The step.
        """
        panel = Panel(image)
        for key, backend in self.backends.items():
            self._send(key, name, lambda b=backend: self._image_to(b, name, panel, step))

    @property
    def needs_panel(self) -> bool:
        """Whether a backend takes the full panel (a ``LocalVisBackend``)."""
        return any(isinstance(b, LocalVisBackend) for b in self.backends.values())

    @property
    def needs_cards(self) -> bool:
        """Whether a backend takes the cards (any backend but ``LocalVisBackend``)."""
        return any(not isinstance(b, LocalVisBackend) for b in self.backends.values())

    def add_views(self, name: str, panel: Optional[np.ndarray], cards: Dict[str, np.ndarray],
                  step: int) -> None:
        """Send one probe's views: the full panel to ``LocalVisBackend`` (the PNG people open),
        the cards (:func:`.cards.render_cards`) to every other backend, as ``{name}/{slot}``:
        TensorBoard and W&B group those names under ``name``, one card per slot with the step
        slider for time; MLflow stores ``{name}/{slot}_{step}.png``. The panel, or the cards,
        count as one item per backend; a backend that fails on one card loses that item.

        Args:
            name (str): The probe's and method's name (no ``/``).
            panel (np.ndarray, optional): The full panel, ``(H, W, 3)`` uint8 **BGR**; may be
                None when no backend :attr:`needs_panel`.
            cards (dict[str, np.ndarray]): The cards by slot name, uint8 **BGR**; may be empty
                when no backend :attr:`needs_cards`.
            step (int): The step.
        """
        full = Panel(panel)
        views = {f'{name}/{slot}': Panel(card) for slot, card in cards.items()}
        for key, backend in self.backends.items():
            if isinstance(backend, LocalVisBackend):
                self._send(key, name, lambda b=backend: self._local_image(b, name, full, step))
            else:
                self._send(key, name, lambda b=backend: self._cards_to(b, views, step))

    def _cards_to(self, backend, views: Dict[str, Panel], step: int) -> None:
        failed = []
        for tag, card in views.items():  # one failing card does not cost the others
            try:
                self._image_to(backend, tag, card, step)
            except Exception as exc:  # noqa: BLE001 - recorded (and raised) below
                if self.strict:
                    raise
                failed.append(f'{tag}: {type(exc).__name__}: {exc}')
        if failed:
            raise RuntimeError(f'{len(failed)} of {len(views)} card(s) lost; first: '
                               f'{failed[0]}')

    def _image_to(self, backend, name: str, panel: Panel, step: int) -> None:
        if isinstance(backend, MLflowVisBackend):
            backend.add_image(f'{name}_{step}.png', panel.rgb, step=step)
        elif isinstance(backend, LocalVisBackend):
            self._local_image(backend, name, panel, step)
        elif isinstance(backend, TensorboardVisBackend):
            self._tensorboard_image(backend, name, panel, step)
        else:
            backend.add_image(name, panel.rgb, step=step)

    def add_scalars(self, scalars: Dict[str, float], step: int) -> None:
        """Send one dict of scalars to every backend.

        Args:
            scalars (dict[str, float]): The scalars by tag.
            step (int): The step.
        """
        for key, backend in self.backends.items():
            self._send(key, 'scalars ' + ', '.join(scalars),
                       lambda b=backend: b.add_scalars(scalars, step=step))

    def warn_losses(self, logger, step: int, warned: set) -> None:
        """Warn about each backend that lost items, the first time it does.

        Args:
            logger (MMLogger): Where the warning goes.
            step (int): The step, named in the warning.
            warned (set[str]): Backends already warned about (of earlier deliveries); updated.
        """
        for backend, losses in self.lost.items():
            if backend not in warned:
                warned.add(backend)
                kept = [b for b in self.sent if b not in self.lost]
                logger.warning(
                    f'DetCAMHook: {backend} lost {len(losses)} item(s) at step {step} '
                    f'(first: {losses[0]}); kept by: {", ".join(kept) or "no backend"}. '
                    'Training continues; later losses are counted in the summary line.')

    def delivered(self) -> str:
        """``'LocalVisBackend 5/5, WandbVisBackend 3/5 LOST'``: items received of items sent,
        per backend ('' without backends)."""
        return ', '.join(
            f'{b} {n - len(self.lost.get(b, []))}/{n}' + (' LOST' if b in self.lost else '')
            for b, n in self.sent.items())

    def _send(self, key: str, what: str, call) -> None:
        self.sent[key] += 1
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a backend's failure must not stop training
            if self.strict:
                raise
            self.lost.setdefault(key, []).append(f'{what}: {type(exc).__name__}: {exc}')

    @staticmethod
    def _local_image(backend: LocalVisBackend, name: str, panel: Panel, step: int) -> None:
        """Write the PNG ``backend.add_image`` would write (same folder, name and pixels)."""
        # `experiment` initialises the backend; `_img_save_dir` is where its add_image writes
        folder = backend.experiment._img_save_dir
        os.makedirs(folder, exist_ok=True)
        path = osp.join(folder, f'{name}_{step}.png')
        try:
            with open(path, 'wb') as file:
                file.write(panel.png)
        except OSError as exc:
            raise OSError(f'{path} was not written; check that {folder} is writable and the '
                          f'disk has space ({exc})') from exc

    @staticmethod
    def _tensorboard_image(backend: TensorboardVisBackend, name: str, panel: Panel,
                           step: int) -> None:
        """The event ``backend.add_image`` would log (tag ``name``, the panel's pixels as PNG,
        ``step``), from the already encoded PNG; ``add_image`` itself on another writer."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        writer = backend.experiment  # initialises the backend
        file_writer = getattr(writer, 'file_writer', None)
        if not isinstance(writer, SummaryWriter) or file_writer is None:  # tensorboardX
            backend.add_image(name, panel.rgb, step=step)
            return
        height, width = panel.bgr.shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3,
                              encoded_image_string=panel.png)
        file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
