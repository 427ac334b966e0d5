"""One place that checks the numbers users type: finite floats in a stated range.

``float("nan")`` and ``float("inf")`` parse without complaint, and ``nan`` fails every comparison, so
a check written as ``if x < 0: raise`` lets it through (a ``--stability-weight nan`` trained a
stabilizer whose weights were all NaN). :func:`finite_float` refuses non-finite values first and then
checks the range; :func:`float_arg` wraps it as an argparse ``type=`` for the CLI (the error is an
:class:`~vbridge_core.errors.InputError`, which the CLI prints as one ``error:`` line), and the
ComfyUI nodes call :func:`finite_float` on their float inputs. :func:`check_finite_tensors` refuses
model files (LoRAs, stabilizers) holding NaN/inf weights.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional

from .errors import InputError, ModelFileError


def _fmt(x: float) -> str:
    return f"{x:g}"


def describe_range(min: Optional[float] = None, max: Optional[float] = None, *, min_inclusive: bool = True,
                   max_inclusive: bool = True) -> str:
    """The allowed range in words, e.g. ``"a finite number >= 0"`` or ``"a finite number in (0, 1]"``."""
    if min is not None and max is not None:
        return f"a finite number in {'[' if min_inclusive else '('}{_fmt(min)}, {_fmt(max)}{']' if max_inclusive else ')'}"
    if min is not None:
        if min == 0 and not min_inclusive:
            return "a positive finite number"
        return f"a finite number {'>=' if min_inclusive else '>'} {_fmt(min)}"
    if max is not None:
        return f"a finite number {'<=' if max_inclusive else '<'} {_fmt(max)}"
    return "a finite number"


def finite_float(name: str, value: Any, *, min: Optional[float] = None, max: Optional[float] = None,
                 min_inclusive: bool = True, max_inclusive: bool = True, hint: str = "") -> float:
    """``value`` as a float, checked to be finite and inside the range; else :class:`InputError`.

    ``name`` is how the user knows the setting (``--stability-weight`` on the CLI, ``stability_weight``
    on a node); the message names it, the allowed range and the value given, plus ``hint`` if any.
    Strings such as ``"0.5"`` are accepted (argparse passes text); bools are refused.
    """
    rng = describe_range(min, max, min_inclusive=min_inclusive, max_inclusive=max_inclusive)
    tail = f"; {hint}" if hint else ""
    if isinstance(value, bool):
        raise InputError(f"{name} must be {rng}, got {value!r}{tail}")
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {rng}, got {value!r}{tail}") from None
    if not math.isfinite(x):
        raise InputError(f"{name} must be {rng}, got {value!r} (NaN and infinity are not allowed){tail}")
    low_bad = min is not None and (x < min or (not min_inclusive and x == min))
    high_bad = max is not None and (x > max or (not max_inclusive and x == max))
    if low_bad or high_bad:
        raise InputError(f"{name} must be {rng}, got {_fmt(x)}{tail}")
    return x


def optional_finite_float(name: str, value: Any, **kw: Any) -> Optional[float]:
    """:func:`finite_float`, with ``None`` passed through (an option left at its default)."""
    return None if value is None else finite_float(name, value, **kw)


def float_arg(name: str, **kw: Any) -> Callable[[str], float]:
    """An argparse ``type=`` for the option ``name``: a finite float in the range of :func:`finite_float`.

    It raises :class:`InputError` (not ``ArgumentTypeError``), so the CLI's ``main()`` prints it as
    one ``error: ...`` line with exit code 2 like every other bad input.
    """
    def parse(text: str) -> float:
        return finite_float(name, text, **kw)

    parse.__name__ = "float"  # argparse names the type in its own messages
    return parse


def float_list_arg(name: str, example: str = "1.0,0.757,0.522", **kw: Any) -> Callable[[str], list[float]]:
    """An argparse ``type=`` for a comma-separated list of finite floats (each in the given range)."""
    def parse(text: str) -> list[float]:
        items = [x for x in text.replace(" ", "").split(",") if x]
        if not items:
            raise InputError(f"{name} takes comma-separated numbers such as {example}, got {text!r}")
        out = []
        for x in items:
            try:
                out.append(finite_float(name, x, **kw))
            except InputError as e:
                raise InputError(f"{e} (in the list {text!r}; give numbers such as {example})") from None
        return out

    parse.__name__ = "float list"
    return parse


def check_finite_tensors(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], path: str | os.PathLike,
                         what: str, fix: str) -> None:
    """Refuse a file whose floating-point tensors hold NaN or infinity (:class:`ModelFileError`).

    ``what`` names the kind of file ("stabilizer", "LoRA"), ``fix`` says what to do ("retrain it").
    The message lists up to three offending tensor names.
    """
    import torch

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = [k for k, t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
           and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ModelFileError(f"{what} file {path} holds NaN/inf values (in {', '.join(bad[:3])}{more}): it is "
                             f"broken and would turn every output into NaN; {fix}")
