"""When the hook draws: MMEngine's train-loop schedule replayed from the loop's state, so that
``interval`` counts validations from the start of training, also across a ``--resume``.

Every function reads ``runner._train_loop``, the one private attribute of the runner read here:
the public ``runner.train_loop`` (and ``runner.epoch``, ``runner.iter``, ``runner.max_epochs``,
which go through it) *builds* the train loop and its dataloader when it is still a config dict,
as it is in a stand-alone ``val``/``test`` run. MMEngine's own ``LoggerHook`` guards its step the
same way (``logger_hook.py``). Once the loop is built, its public attributes are read.
"""
import bisect
from typing import Optional, Sequence

from mmengine.runner import BaseLoop, EpochBasedTrainLoop, IterBasedTrainLoop


def count_validations(done: int, last: int, val_begin: int, milestones: Sequence[int],
                      intervals: Sequence[int]) -> int:
    """How many validations an MMEngine train loop has run once ``done`` epochs (or
    iterations) are complete, counted from the start of training.

    It replays the rule of ``EpochBasedTrainLoop.run`` and ``IterBasedTrainLoop.run``: after
    step ``c`` (1-based) the loop validates if ``c >= val_begin`` and ``c % interval == 0`` or
    ``c == last``, where ``_decide_current_val_interval`` sets ``interval`` to
    ``intervals[bisect(milestones, c + 1) - 1]`` (``milestones`` starts with 0, as the loop's
    ``dynamic_milestones``; ``dynamic_intervals`` in a config adds the later ones). Each
    interval's stretch of steps is counted in closed form, so the cost does not grow with the
    length of training.

    Args:
        done (int): Completed epochs (or iterations), the loop's ``epoch`` (or ``iter``).
        last (int): ``max_epochs`` (or ``max_iters``).
        val_begin (int): The loop's ``val_begin``.
        milestones (Sequence[int]): The loop's ``dynamic_milestones``, ascending, first 0.
        intervals (Sequence[int]): The loop's ``dynamic_intervals``, one per milestone.

    Returns:
        int: The number of validations at steps ``1..done``.
    """
    first = max(int(val_begin), 1)
    ends = [m - 2 for m in milestones[1:]] + [done]
    count = 0
    for start, end, interval in zip(milestones, ends, intervals):
        # step c uses this interval while start <= c + 1 < next milestone
        lo, hi = max(first, start - 1), min(done, end)
        if lo <= hi:
            count += hi // interval - (lo - 1) // interval
    final_interval = intervals[bisect.bisect(milestones, last + 1) - 1]
    if first <= last <= done and last % final_interval:
        count += 1  # the last step always validates
    return count


def _built_train_loop(runner) -> Optional[BaseLoop]:
    """The runner's train loop if it is built, else None (never builds it; see the module
    docstring for why the private attribute is read)."""
    loop = getattr(runner, '_train_loop', None)
    return loop if isinstance(loop, BaseLoop) else None


def validation_ordinal(runner) -> Optional[int]:
    """The 1-based number of the current validation since the start of training.

    Args:
        runner (Runner): The runner, during a validation.

    Returns:
        int | None: From the train loop's state (epoch or iteration, ``val_begin``, dynamic
        intervals); None without a built ``EpochBasedTrainLoop`` or ``IterBasedTrainLoop``.
    """
    loop = _built_train_loop(runner)
    if isinstance(loop, EpochBasedTrainLoop):
        done, last = loop.epoch, loop.max_epochs
    elif isinstance(loop, IterBasedTrainLoop):
        done, last = loop.iter, loop.max_iters
    else:
        return None
    return count_validations(done, last, loop.val_begin, loop.dynamic_milestones,
                             loop.dynamic_intervals)


def is_final_validation(runner) -> bool:
    """Whether this is the last validation of training, or a validation outside training.

    Args:
        runner (Runner): The runner, during a validation.

    Returns:
        bool: True after the last epoch (iteration), or without a built train loop.
    """
    loop = _built_train_loop(runner)
    if loop is None:
        return True
    if isinstance(loop, EpochBasedTrainLoop):
        return loop.epoch >= loop.max_epochs
    return loop.iter >= loop.max_iters


def step(runner) -> int:
    """The step the hook logs at: the epoch for epoch-based training (as ``LoggerHook`` logs
    validation metrics), the iteration otherwise, 0 in a stand-alone ``val``/``test`` run.

    Args:
        runner (Runner): The runner.

    Returns:
        int: The step.
    """
    loop = _built_train_loop(runner)
    if loop is None:
        return 0
    return loop.epoch if isinstance(loop, EpochBasedTrainLoop) else loop.iter
