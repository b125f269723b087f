"""What :class:`~mmdet_cam_hook.hooks.cam_hook.DetCAMHook` logs of a run over its probes
besides their views: the numbers gathered probe by probe and their scalars
(:class:`RunNumbers`), and the run's messages (:class:`RunLog`: a failed probe, the
faithfulness curves' plot, a backend's losses, the summary line), each warning given once.
"""
import math
import traceback
from typing import Dict, Sequence

from ..evaluation.metrics import MapScores
from ..evaluation.misses import MissCounts
from ..visualization.delivery import Delivery
from .probes import Probe, safe_name
from .views import curves_plot

#: The key of a probe's misses and false-positive flags among its per-method numbers (never a
#: method's name).
MISSES = '(misses)'


class RunNumbers:
    """The numbers of one run over the probes: per method a
    :class:`~..evaluation.metrics.MapScores`, the misses'
    :class:`~..evaluation.misses.MissCounts`, and per method the probes' curves under the
    ``prior`` protocol (``faithfulness``).

    Args:
        methods (Sequence[str]): The methods' names.
    """

    def __init__(self, methods: Sequence[str]) -> None:
        self.methods = list(methods)
        self.scores = {method: MapScores() for method in self.methods}
        self.misses = MissCounts()
        self.curves: Dict[str, list] = {}  # {method: [Curves of each probe]}, prior protocol

    def add(self, numbers: Dict[str, tuple], curves: dict) -> None:
        """Add one probe that succeeded: its per-method numbers (``DetCAMHook._explain_probe``,
        with the misses under :data:`MISSES`) and its curves (``{method: {protocol:
        Curves}}``)."""
        if MISSES in numbers:
            self.misses.update(*numbers.pop(MISSES))
        for method, (image_scores, aucs) in numbers.items():
            self.scores[method].add(image_scores, aucs)
        for method, by_protocol in curves.items():
            self.curves.setdefault(method, []).append(by_protocol['prior'])

    def scalars(self, mode: str) -> Dict[str, float]:
        """``cam_{mode}/{method}_{name}`` for each method's summary, and ``cam_{mode}/{name}``
        for the misses' (the finite ones) when a probe counted them."""
        scalars = {f'cam_{mode}/{safe_name(method)}_{name}': value
                   for method in self.methods
                   for name, value in self.scores[method].summary().items()}
        if self.misses.images:
            scalars.update({f'cam_{mode}/{name}': value for name, value in
                            self.misses.summary().items() if math.isfinite(value)})
        return scalars


class RunLog:
    """The hook's messages to ``runner.logger``, with what it has said already, so that a
    probe's traceback, a backend's first loss and the missing plotting library are each told
    once."""

    def __init__(self) -> None:
        self.lost_warned: set = set()  # backends whose lost panels were reported
        self.failed: set = set()  # probes whose failure traceback was logged
        self.plot_warned = False

    def probe_failed(self, runner, probe: Probe, mode: str, step: int,
                     exc: Exception) -> None:
        """Warn that ``probe`` failed (called while handling ``exc``): the traceback the first
        time, then the error alone."""
        # The traceback once per probe; the step keeps each message unique (MMLogger drops
        # repeated warnings).
        detail = f'{type(exc).__name__}: {exc}' if probe.name in self.failed \
            else '\n' + traceback.format_exc()
        self.failed.add(probe.name)
        runner.logger.warning(
            f'DetCAMHook: probe {probe.name!r} ({probe.path}) failed after '
            f'{mode} at step {step}; the other probes are still logged (strict=True '
            f'raises instead): {detail}')

    def log_curves(self, runner, log: Delivery, mode: str, step: int, curves: dict) -> None:
        """The probes' deletion/insertion curves (``faithfulness``) as one plot image,
        ``cam_{mode}_faithfulness_curves``, beside the AUC scalars; without matplotlib, one
        warning for the run and no plot."""
        if not curves:
            return
        try:
            plot = curves_plot(curves, title=f'{mode}, step {step}')
        except ImportError as exc:
            if not self.plot_warned:
                self.plot_warned = True
                runner.logger.warning(f'DetCAMHook: the faithfulness curves are not plotted '
                                      f'(the AUC scalars are logged): {exc}')
            return
        log.add_image(f'cam_{mode}_faithfulness_curves', plot, step)

    def report(self, runner, mode: str, step: int, explained: int, probes: int, methods: int,
               log: Delivery, seconds: float, scalars: Dict[str, float]) -> None:
        """One info line; a warning the first time a backend loses panels or scalars."""
        log.warn_losses(runner.logger, step, self.lost_warned)
        summary = ''.join(f'; {k.split("/")[1]}={v:.3f}' for k, v in scalars.items())
        runner.logger.info(
            f'DetCAMHook: explained {explained}/{probes} probe image(s) x '
            f'{methods} method(s) after {mode} at step {step} in {seconds:.1f} s; '
            f'items delivered per backend: {log.delivered() or "none"}{summary}')
