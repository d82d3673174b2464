"""The exercise-check framework.

A check compares a learner's function (or class) with the reference implementation on seeded
random inputs and hand-made edge cases. Every outcome is one line in the notebook:

    ✓ Exercise 0.1 cosine_similarity_matrix — matches the reference on 5 cases (...)
    ✗ Exercise 0.1 cosine_similarity_matrix — case 'two vectors': ... looks like you ...
    … Exercise 0.1 cosine_similarity_matrix — not attempted yet: replace `raise NotImplementedError()`

Known plausible wrong answers live next to each check as :class:`Mistake` objects. They do two
jobs: when a learner's output matches one, the check prints its targeted hint; and the test suite
(``tests/test_checks_*.py``) proves that the check rejects every one of them.

``course check`` reads the outcome from a custom MIME type in the cell output, so the same call
works in Jupyter, in Colab and headless.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

RESULT_MIME = "application/vnd.mi-course.check+json"

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"

_silent: contextvars.ContextVar[bool] = contextvars.ContextVar("course_check_silent", default=False)


#: What a stopped check cell shows in Jupyter instead of a traceback through this package. The
#: check has already printed its one coloured line; this line says why Run All stopped. Stopping is
#: deliberate: the cells after an exercise use the learner's function, so running on would only
#: trade this line for a NotImplementedError traceback in a figure cell further down.
STOP_NOTE = {
    NOT_ATTEMPTED: (
        "Run All stops at an unfinished exercise, on purpose: the cells below use your answer. "
        "Write it, run this check again, then run on from here."
    ),
    FAILED: (
        "Run All stops at a failing check, on purpose: the cells below use your answer. "
        "Fix it (the line above says where to look), run this check again, then run on."
    ),
}


class CheckFailed(AssertionError):
    """The learner's answer is wrong; the message says what and where to look."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [STOP_NOTE[FAILED]]


class NotAttempted(Exception):
    """The learner has not replaced the stub's ``raise NotImplementedError()`` yet."""

    def _render_traceback_(self) -> list[str]:
        return [STOP_NOTE[NOT_ATTEMPTED]]


@dataclass(frozen=True)
class Exercise:
    number: str  # "1.3"
    name: str  # the function or class the learner writes


@dataclass
class Case:
    """One input on which learner and reference are compared."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A plausible wrong implementation and the hint to show when a learner's output matches it."""

    name: str
    impl: Callable
    hint: str


# ----------------------------------------------------------------------------- reporting


def _emit(exercise: Exercise, status: str, message: str) -> None:
    if _silent.get():
        return
    icon = {PASSED: "✓", FAILED: "✗", NOT_ATTEMPTED: "…"}[status]
    colour = {PASSED: "#1a7f37", FAILED: "#cf222e", NOT_ATTEMPTED: "#9a6700"}[status]
    text = f"{icon} Exercise {exercise.number} {exercise.name} — {message}"
    payload = {
        "number": exercise.number,
        "name": exercise.name,
        "status": status,
        "message": message,
    }
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:
            raise ImportError
    except ImportError:
        print(text)
        return
    import html

    body = html.escape(text).replace("\n", "<br>")
    bundle = {
        "text/plain": text,
        "text/html": f'<div style="color:{colour};font-family:monospace">{body}</div>',
        RESULT_MIME: payload,
    }
    display(bundle, raw=True)


def exercise(number: str, name: str) -> Callable:
    """Decorator that turns a check body into a reported exercise check.

    The body receives the learner's object and either returns a short summary of what it checked
    (pass) or raises :class:`CheckFailed`. A ``NotImplementedError`` from the learner's code means
    "not attempted"; any other exception from the learner's code becomes a failure that names it.
    """
    ex = Exercise(number, name)

    def decorate(body: Callable[..., str]) -> Callable[..., None]:
        @functools.wraps(body)
        def check(learner: Any, *args: Any, **kwargs: Any) -> None:
            try:
                summary = body(learner, *args, **kwargs)
            except NotImplementedError:
                message = (
                    "not attempted yet: replace `raise NotImplementedError()` in "
                    f"`{name}` with your implementation, then run the check again."
                )
                _emit(ex, NOT_ATTEMPTED, message)
                raise NotAttempted(f"Exercise {number} {name}: {message}") from None
            except CheckFailed as failure:
                _emit(ex, FAILED, str(failure))
                raise CheckFailed(f"Exercise {number} {name}: {failure}") from None
            except Exception as error:  # the learner's code crashed inside the check
                message = describe_crash(error)
                _emit(ex, FAILED, message)
                raise CheckFailed(f"Exercise {number} {name}: {message}") from None
            _emit(ex, PASSED, summary)

        check.exercise = ex  # type: ignore[attr-defined]
        return check

    return decorate


def describe_crash(error: BaseException) -> str:
    """Name the exception and the learner's own line that raised it (not torch internals)."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [
        f for f in frames if "course_utils" not in f.filename and "site-packages" not in f.filename
    ]
    where = ""
    if own:
        frame = own[-1]
        line = (frame.line or "").strip()
        where = f" in `{frame.name}`" + (f" at `{line}`" if line else "")
    return f"your code raised {type(error).__name__}{where}: {error}"


def exercises_of(module: Any) -> list[Exercise]:
    """The exercises a chapter's checks module defines, in exercise-number order."""
    found = [obj.exercise for obj in vars(module).values() if hasattr(obj, "exercise")]
    unique = {e.number: e for e in found if isinstance(e, Exercise)}

    def key(e: Exercise) -> tuple[int, ...]:
        return tuple(int(p) for p in e.number.split("."))

    return sorted(unique.values(), key=key)


# ----------------------------------------------------------------------------- comparing


def _fmt_shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def mismatch(
    expected: Any, actual: Any, atol: float, rtol: float, path: str = "output"
) -> str | None:
    """None when ``actual`` matches ``expected``; else a sentence saying how they differ."""
    if isinstance(expected, torch.Tensor):
        if actual is None:
            return f"{path} is None — did you forget to `return` it?"
        if not isinstance(actual, torch.Tensor):
            return f"{path} should be a torch.Tensor of shape {tuple(expected.shape)}, got {type(actual).__name__}"
        if actual.shape != expected.shape:
            return f"{path} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        if expected.dtype.is_floating_point != actual.dtype.is_floating_point:
            return f"{path} has dtype {actual.dtype}, expected {expected.dtype}"
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        if torch.isnan(a).any() and not torch.isnan(e).any():
            return f"{path} contains NaN (a division by zero, or log of 0?)"
        if torch.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True):
            return None
        diff = (a - e).abs().nan_to_num(nan=float("inf"))
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        where = f" at index {index}" if index else ""
        return (
            f"{path} differs from the reference: max abs diff {diff.max().item():.3g}{where} "
            f"(expected {e[index].item():.5g}, got {a[index].item():.5g})"
        )
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"{path} should be a {type(expected).__name__} of {len(expected)} items, got {actual!r:.80}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            problem = mismatch(e, a, atol, rtol, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            keys = sorted(actual) if isinstance(actual, dict) else type(actual).__name__
            return f"{path} should be a dict with keys {sorted(expected)}, got {keys}"
        for k in expected:
            problem = mismatch(expected[k], actual[k], atol, rtol, f"{path}[{k!r}]")
            if problem:
                return problem
        return None
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        if isinstance(actual, torch.Tensor) and actual.numel() == 1:
            actual = actual.item()
        if actual is None:
            return f"{path} is None — did you forget to `return` it?"
        if not isinstance(actual, (int, float)):
            return f"{path} should be a number, got {type(actual).__name__}"
        if abs(actual - expected) <= atol + rtol * abs(expected):
            return None
        return f"{path} is {actual:.6g}, expected {expected:.6g}"
    if actual != expected:
        return f"{path} is {actual!r:.80}, expected {expected!r:.80}"
    return None


def cmp(name: str, mine: Any, reference: Any, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Karpathy-style one-liner: print whether two results are exact, close, or how far apart."""
    if isinstance(mine, torch.Tensor) and isinstance(reference, torch.Tensor):
        if mine.shape != reference.shape:
            print(f"{name:24s} | shapes differ: {tuple(mine.shape)} vs {tuple(reference.shape)}")
            return
        exact = bool(torch.equal(mine, reference))
        close = bool(torch.allclose(mine.double(), reference.double(), atol=atol, rtol=rtol))
        maxdiff = (mine.double() - reference.double()).abs().max().item() if mine.numel() else 0.0
        print(
            f"{name:24s} | exact: {exact!s:5} | approximate: {close!s:5} | maxdiff: {maxdiff:.3g}"
        )
        return
    problem = mismatch(reference, mine, atol, rtol, name)
    print(f"{name:24s} | " + ("match" if problem is None else problem))


def _param_names(fn: Callable) -> str:
    return ", ".join(inspect.signature(fn).parameters)


def check_signature(learner: Callable, reference: Callable, case: Case) -> None:
    """Fail with a clear message when the learner changed the stub's signature."""
    try:
        inspect.signature(learner).bind(*case.args, **case.kwargs)
    except TypeError as error:
        ours = f"{reference.__name__}({_param_names(reference)})"
        theirs = f"{getattr(learner, '__name__', 'your function')}({_param_names(learner)})"
        raise CheckFailed(
            f"wrong signature: yours is `{theirs}` but the check calls `{ours}` ({error}). "
            "Keep the stub's parameter names and order."
        ) from None
    except ValueError:  # builtins without a signature: let the call itself decide
        pass


def _copy_args(case: Case) -> tuple[tuple, dict]:
    return copy.deepcopy(case.args), copy.deepcopy(case.kwargs)


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in _tensors_in(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors_in(x)]
    return []


def compare_function(
    learner: Callable,
    reference: Callable,
    cases: Sequence[Case],
    mistakes: Sequence[Mistake] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    compare: Callable[[Any, Any], str | None] | None = None,
) -> str:
    """Run learner and reference on every case; raise :class:`CheckFailed` on the first mismatch.

    ``compare(expected, actual)`` may replace the default element-wise comparison (e.g. for
    outputs that are only defined up to a permutation); it returns None or a description.
    On a mismatch, every known mistake is run on the same case; if one reproduces the learner's
    output, its hint is added to the message.
    """
    if not callable(learner):
        raise CheckFailed(
            f"expected a function, got {type(learner).__name__}: pass the function itself, not its result."
        )
    compare = compare or (lambda e, a: mismatch(e, a, atol, rtol))
    for case in cases:
        check_signature(learner, reference, case)
        args, kwargs = _copy_args(case)
        before = [t.clone() for t in _tensors_in((args, kwargs))]
        try:
            actual = learner(*args, **kwargs)
        except NotImplementedError:
            raise
        except Exception as error:
            hint = diagnose_crash(error, case, mistakes)
            if hint is None:
                raise
            raise CheckFailed(
                f"case '{case.name}': {describe_crash(error)}. Hint: {hint}"
            ) from None
        after = _tensors_in((args, kwargs))
        if any(
            b.shape != a.shape or not torch.equal(b, a) for b, a in zip(before, after, strict=False)
        ):
            raise CheckFailed(
                f"case '{case.name}': your function changed one of its input tensors in place. "
                "Work on a copy (or use out-of-place ops such as `x = x * 2`, not `x *= 2`)."
            )
        ref_args, ref_kwargs = _copy_args(case)
        expected = reference(*ref_args, **ref_kwargs)
        problem = compare(expected, actual)
        if problem is None:
            continue
        message = f"case '{case.name}': {problem}" + ("" if problem.endswith(("?", ".")) else ".")
        hint = diagnose(actual, case, mistakes, compare)
        if hint:
            message += f" Hint: {hint}"
        raise CheckFailed(message)
    names = ", ".join(c.name for c in cases)
    return f"matches the reference on {len(cases)} cases ({names})"


def diagnose_crash(error: Exception, case: Case, mistakes: Sequence[Mistake]) -> str | None:
    """The hint of a known mistake that crashes the same way as the learner's code did."""
    for mistake in mistakes:
        args, kwargs = _copy_args(case)
        try:
            mistake.impl(*args, **kwargs)
        except Exception as wrong:
            if type(wrong) is type(error) and str(wrong) == str(error):
                return mistake.hint
    return None


def diagnose(
    actual: Any, case: Case, mistakes: Sequence[Mistake], compare: Callable[[Any, Any], str | None]
) -> str | None:
    """The hint of the first known mistake whose output equals the learner's on this case."""
    for mistake in mistakes:
        args, kwargs = _copy_args(case)
        try:
            wrong = mistake.impl(*args, **kwargs)
        except Exception:  # a mistake that cannot run on this case tells us nothing
            continue
        if compare(wrong, actual) is None:
            return mistake.hint
    return None


def lifted_mistakes(mistakes: Sequence[Mistake], run: Callable[[Any], Callable]) -> list[Mistake]:
    """Wrap each mistake with ``run`` so checks of hooks or classes can diagnose like functions."""
    return [Mistake(m.name, run(m.impl), m.hint) for m in mistakes]


def outcome(check: Callable, learner: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    """Run a check silently and return (status, message). Used by tests and graders."""
    token = _silent.set(True)
    try:
        check(learner, *args, **kwargs)
    except NotAttempted as e:
        return NOT_ATTEMPTED, str(e)
    except CheckFailed as e:
        return FAILED, str(e)
    finally:
        _silent.reset(token)
    return PASSED, ""


def stub(*args: Any, **kwargs: Any) -> Any:
    """What every untouched exercise stub does."""
    raise NotImplementedError()
