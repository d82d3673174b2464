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
            except NotImplementedError as error:
                # a check of something other than a stub (e.g. a notebook's results) may say
                # what "not attempted" means for it
                message = getattr(error, "not_attempted", None) or (
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
            return (
                f"{path} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)} "
                f"(dtype {str(expected.dtype).replace('torch.', '')})"
            )
        if expected.dtype.is_floating_point != actual.dtype.is_floating_point:
            return (
                f"{path} has dtype {actual.dtype}, expected {expected.dtype} "
                f"(shape {tuple(expected.shape)})"
            )
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        if torch.isnan(a).any() and not torch.isnan(e).any():
            return f"{path} contains NaN (a division by zero, or log of 0?)"
        if torch.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True):
            return None
        diff = (a - e).abs().nan_to_num(nan=float("inf"))
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        where = f" at index {index}" if index else ""
        return (
            f"{path} (shape {tuple(actual.shape)}, {str(actual.dtype).replace('torch.', '')}) "
            f"differs from the reference: max abs diff {diff.max().item():.3g}{where} "
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
        if actual != actual and expected != expected:  # both NaN: the same answer
            return None
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
    output (and also agrees with the reference on the cases the learner passed), its hint is
    added to the message. Any ``torch.nn.Module`` among a case's arguments must come back with no
    hook left on it, its weights unchanged and the same clean forward pass.
    """
    if not callable(learner):
        raise CheckFailed(
            f"expected a function, got {type(learner).__name__}: pass the function itself, not its result."
        )
    compare = compare or (lambda e, a: mismatch(e, a, atol, rtol))
    passed: list[tuple[Case, Any]] = []
    for case in cases:
        check_signature(learner, reference, case)
        args, kwargs = _copy_args(case)
        before = [t.clone() for t in _tensors_in((args, kwargs))]
        modules = _modules_in((args, kwargs))
        snapshots = [model_snapshot(m) for m in modules]
        try:
            actual = learner(*args, **kwargs)
        except NotImplementedError:
            raise
        except Exception as error:
            hint = diagnose_crash(error, case, mistakes, passed, compare)
            if hint is None:
                raise
            raise CheckFailed(
                f"case '{case.name}': {describe_crash(error)}. Hint: {hint}"
            ) from None
        for module, snapshot in zip(modules, snapshots, strict=True):
            problem = model_changes(module, snapshot)
            if problem:
                raise CheckFailed(f"case '{case.name}': {problem}.")
        after = _tensors_in((args, kwargs))
        if any(
            b.shape != a.shape or not torch.equal(b, a) for b, a in zip(before, after, strict=False)
        ):
            raise CheckFailed(
                f"case '{case.name}': your function changed one of its input tensors in place. "
                "Work on a copy (or use out-of-place ops such as `x = x * 2`, not `x *= 2`)."
            )
        ref_args, ref_kwargs = _copy_args(case)
        calls = _recorded.get()
        if calls is not None:
            calls.append((reference, case))
        expected = reference(*ref_args, **ref_kwargs)
        problem = compare(expected, actual)
        if problem is None:
            passed.append((case, expected))
            continue
        message = f"case '{case.name}': {problem}" + ("" if problem.endswith(("?", ".")) else ".")
        hint = diagnose(actual, case, mistakes, compare, passed)
        if hint:
            message += f" Hint: {hint}"
        raise CheckFailed(message)
    names = ", ".join(c.name for c in cases)
    return f"matches the reference on {len(cases)} cases ({names})"


def _run_quietly(impl: Callable, case: Case) -> tuple[bool, Any]:
    args, kwargs = _copy_args(case)
    try:
        return True, impl(*args, **kwargs)
    except Exception as error:  # a mistake that cannot run on this case tells us nothing
        return False, error


def _only_hint(
    candidates: list[Mistake],
    passed: Sequence[tuple[Case, Any]],
    compare: Callable[[Any, Any], str | None],
) -> str | None:
    """One hint, never a wrong one: a mistake that fits this case must also agree with the
    reference on the cases the learner passed (else the learner's code is not that mistake);
    if mistakes with different hints remain, give none."""
    if candidates:
        kept = []
        for mistake in candidates:
            fits = True
            for case, expected in passed:
                ok, out = _run_quietly(mistake.impl, case)
                if not ok or compare(expected, out) is not None:
                    fits = False
                    break
            if fits:
                kept.append(mistake)
        candidates = kept
    hints = {m.hint for m in candidates}
    return hints.pop() if len(hints) == 1 else None


def diagnose_crash(
    error: Exception,
    case: Case,
    mistakes: Sequence[Mistake],
    passed: Sequence[tuple[Case, Any]] = (),
    compare: Callable[[Any, Any], str | None] | None = None,
) -> str | None:
    """The hint of a known mistake that crashes the same way as the learner's code did."""
    candidates = []
    for mistake in mistakes:
        ok, wrong = _run_quietly(mistake.impl, case)
        if not ok and type(wrong) is type(error) and str(wrong) == str(error):
            candidates.append(mistake)
    return _only_hint(candidates, passed, compare or (lambda e, a: mismatch(e, a, 1e-5, 1e-4)))


def diagnose(
    actual: Any,
    case: Case,
    mistakes: Sequence[Mistake],
    compare: Callable[[Any, Any], str | None],
    passed: Sequence[tuple[Case, Any]] = (),
) -> str | None:
    """The hint of the known mistake whose output equals the learner's on this case."""
    candidates = []
    for mistake in mistakes:
        ok, wrong = _run_quietly(mistake.impl, case)
        if ok and compare(wrong, actual) is None:
            candidates.append(mistake)
    return _only_hint(candidates, passed, compare)


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


# ----------------------------------------------------------------------------- options


def with_options(case: Case, **options: Any) -> list[Case]:
    """One copy of ``case`` per keyword option, each set to a NON-default value.

    A learner's function that ignores an argument passes every case that uses the default; these
    copies make it visible. The contract tests also assert that every parameter with a default in
    the reference's signature is exercised at a non-default value by some case.
    """
    return [
        Case(f"{case.name} with {name}={value!r:.40}", case.args, {**case.kwargs, name: value})
        for name, value in options.items()
    ]


_recorded: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "course_check_calls", default=None
)


def record_reference_calls() -> contextvars.Token:
    """Tests: start recording (reference, args, kwargs) of every reference call in checks."""
    return _recorded.set([])


def recorded_reference_calls() -> list:
    return _recorded.get() or []


# ----------------------------------------------------------------------------- gradients

GRAD_PREFIX = "gradient reaching "


def _probe_weights(t: torch.Tensor) -> torch.Tensor:
    """Fixed, non-constant weights so that sum(w * out) has a gradient with every entry."""
    n = t.numel()
    w = torch.linspace(0.5, 1.5, n, dtype=torch.float64).reshape(t.shape) if n else t.new_zeros(())
    return w.to(t.dtype)


PRESENCE = " (only that one arrives)"


def with_gradients(
    fn: Callable, wrt: dict[str, int], presence_only: Sequence[str] = ()
) -> Callable:
    """Turn ``fn`` into one that also returns the gradients of its output w.r.t. named inputs.

    ``wrt`` maps a name the learner knows (``"x_hat"``) to a positional index. The output's
    floating tensors are summed with fixed weights and back-propagated; the result is
    ``{"output": out, "gradient reaching x_hat": grad or None, ...}``. Compare with
    :func:`gradient_compare` so a cut graph (``.item()`` re-wrapped, ``.detach()``,
    ``torch.tensor(...)``, numpy) gets a message saying so. For names in ``presence_only`` only
    the arrival of a gradient is checked, not its values (e.g. ``acts`` of an L1 term: |a| and a
    are the same on ReLU outputs, but their subgradients at 0 differ).
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        args = list(args)
        leaves: dict[str, Any] = {}
        for name, index in wrt.items():
            if isinstance(args[index], (list, tuple)):  # a list of tensors: one leaf each
                leaf = [t.detach().clone().requires_grad_(True) for t in args[index]]
            else:
                leaf = args[index].detach().clone().requires_grad_(True)
            args[index] = leaf
            leaves[name] = leaf
        with torch.enable_grad():
            out = fn(*args, **kwargs)
            parts = [
                (t * _probe_weights(t)).sum()
                for t in _tensors_in(out)
                if t.dtype.is_floating_point and t.requires_grad
            ]
            if parts:
                torch.stack([p.to(torch.float64) for p in parts]).sum().backward()
        result = {"output": out}
        for name, leaf in leaves.items():
            key = GRAD_PREFIX + name + (PRESENCE if name in presence_only else "")
            if isinstance(leaf, list):
                for i, t in enumerate(leaf):
                    result[f"{key}[{i}]"] = None if t.grad is None else t.grad.detach()
            else:
                result[key] = None if leaf.grad is None else leaf.grad.detach()
        return result

    return run


def gradient_compare(atol: float = 1e-5, rtol: float = 1e-4) -> Callable[[Any, Any], str | None]:
    """Compare ``with_gradients`` results: values first, then that gradients reach the inputs."""

    def compare(expected: dict, actual: dict) -> str | None:
        problem = mismatch(expected["output"], actual["output"], atol, rtol)
        if problem:
            return problem
        for key, want in expected.items():
            if not key.startswith(GRAD_PREFIX):
                continue
            name, got = key[len(GRAD_PREFIX) :].replace(PRESENCE, ""), actual.get(key)
            presence = PRESENCE in key
            if want is not None and (got is None or (got == 0).all() and (want != 0).any()):
                return (
                    f"the value is right but no gradient flows back to `{name}`: the text says "
                    "this must stay differentiable (training calls .backward() on it). Something "
                    "cut the graph: `.item()` or `float(...)` re-wrapped in `torch.tensor`, "
                    "`.detach()`, `.numpy()`, or a `torch.no_grad()` block"
                )
            if want is not None and not presence:
                problem = mismatch(want, got, atol, rtol, path=f"the gradient w.r.t. `{name}`")
                if problem:
                    return problem
        return None

    return compare


def compare_differentiable(
    learner, reference, cases, mistakes, wrt: dict[str, int], what: str, presence=()
) -> str:
    """``compare_function`` that also compares the gradients reaching the inputs named in ``wrt``
    (for those in ``presence`` only that a gradient arrives: |a| and a agree on ReLU outputs,
    their subgradients at 0 do not). ``what`` names the inputs in the pass message."""
    if not callable(learner):
        return compare_function(learner, reference, [], [])
    return (
        compare_function(
            with_gradients(learner, wrt, presence),
            with_gradients(reference, wrt, presence),
            cases,
            lifted_mistakes(mistakes, lambda f: with_gradients(f, wrt, presence)),
            compare=gradient_compare(),
        )
        + f", and gradients reach {what}"
    )


# ----------------------------------------------------------------------------- models and hooks


def hooks_left(module: torch.nn.Module) -> list[str]:
    """Names of the submodules (TransformerLens hook points included) that still carry hooks."""
    found = []
    for name, sub in module.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            if getattr(sub, attr, None):
                found.append(name or type(module).__name__)
                break
    return found


def _probe_input(module: torch.nn.Module) -> torch.Tensor | None:
    cfg = getattr(module, "cfg", None)
    if cfg is None or not hasattr(cfg, "d_vocab"):
        return None
    return torch.arange(6).remainder(cfg.d_vocab)[None]


def model_snapshot(module: torch.nn.Module) -> dict:
    """What a clean forward pass of ``module`` depends on: its tensors, and its logits on a probe."""
    snap: dict[str, Any] = {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()}
    }
    probe = _probe_input(module)
    if probe is not None:
        with torch.no_grad():
            snap["logits"] = module(probe)
    return snap


def model_changes(module: torch.nn.Module, snapshot: dict) -> str | None:
    """None when ``module`` is as clean as in ``snapshot``; else what the learner's code left."""
    left = hooks_left(module)
    if left:
        shown = ", ".join(left[:3]) + (" ..." if len(left) > 3 else "")
        return (
            f"your code left a hook registered on the model ({shown}) after it returned, so every "
            "later 'clean' run of this model is silently modified. Use `model.run_with_hooks(...)` "
            "or `with model.hooks(fwd_hooks=...):`, or call `model.reset_hooks()` before returning"
        )
    state = module.state_dict()
    for key, before in snapshot["state"].items():
        if key not in state or not torch.equal(state[key], before):
            return (
                f"your code changed the model's `{key}` in place; a function that measures the "
                "model must leave its weights as they were (work on copies)"
            )
    if "logits" in snapshot:
        with torch.no_grad():
            after = module(_probe_input(module))
        if not torch.allclose(after, snapshot["logits"], atol=1e-5, rtol=1e-5):
            return (
                "after your code returned, a clean forward pass of the model gives different "
                "logits than before: something on the model was left changed"
            )
    return None


def _modules_in(obj: Any) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [m for x in obj for m in _modules_in(x)]
    if isinstance(obj, dict):
        return [m for x in obj.values() for m in _modules_in(x)]
    return []


# ----------------------------------------------------------------------------- random generators


def z_for(false_alarm: float, n_tests: int = 1) -> float:
    """Two-sided normal quantile so that n_tests tests together false-alarm with this rate."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - false_alarm / (2 * max(n_tests, 1)))


def frequency_problem(
    name: str,
    observed: torch.Tensor,
    expected: torch.Tensor,
    n: int,
    false_alarm: float = 1e-6,
    n_expected: int | None = None,
) -> str | None:
    """Per-coordinate frequencies against probabilities, each with a binomial tolerance.

    ``observed`` and ``expected`` have the same shape (one entry per coordinate); ``n`` draws per
    coordinate. A correct generator fails with probability at most ``false_alarm`` (Bonferroni).
    When ``expected`` is itself a frequency over ``n_expected`` draws, the two variances add.
    """
    observed, expected = observed.double(), expected.double().expand_as(observed)
    z = z_for(false_alarm, observed.numel())
    pooled = (observed + expected) / 2 if n_expected else expected
    spread = 1 / n + (1 / n_expected if n_expected else 0.0)
    sd = (pooled * (1 - pooled) * spread).sqrt().clamp_min(0.5 / n)
    far = (observed - expected).abs() > z * sd + 1e-9
    if not far.any():
        return None
    index = tuple(int(i) for i in torch.nonzero(far)[0])
    label = name.format(index=list(index)) if "{index}" in name else f"{name} at {list(index)}"
    return (
        f"{label} is {observed[index].item():.3f}, expected {expected[index].item():.3f} "
        f"(± {z * sd[index].item():.3f})"
    )


def correlation_matrix(columns: torch.Tensor) -> torch.Tensor:
    """Pearson correlations of the columns of [n, k]; a constant column correlates 0 with all.

    So does a nearly constant one (under 10 entries off its median, such as a dense mask with one
    exact-zero draw of `torch.rand`): with so few events the normal approximation that
    `dependence_problem` relies on fails, and one shared event would read as correlation 1."""
    x = columns.double()
    c = x - x.mean(0)
    norm = c.norm(dim=0)
    corr = (c.T @ c) / (norm[:, None] * norm[None, :])
    rare = (x != x.median(0).values).sum(0) < 10
    corr[rare, :] = 0.0
    corr[:, rare] = 0.0
    return corr.nan_to_num(0.0)


def dependence_problem(
    name: str,
    expected: torch.Tensor,
    actual: torch.Tensor,
    labels: Callable[[int], str],
    false_alarm: float = 1e-6,
) -> str | None:
    """Compare two samples' correlation matrices (columns = coordinates) entry by entry.

    Under the null both sample correlations are ~N(rho, (1 - rho^2)^2 / n); the tolerance is the
    z for ``false_alarm`` over all pairs times the sd of their difference (at rho = 0, the widest).
    Catches masks or values shared across instances, pairs laid out wrongly, or a coupling lost.
    """
    n = min(len(expected), len(actual))
    want, got = correlation_matrix(expected), correlation_matrix(actual)
    k = want.shape[0]
    z = z_for(false_alarm, max(k * (k - 1) // 2, 1))
    tol = z * (2.0 / n) ** 0.5
    diff = (got - want).abs()
    diff.fill_diagonal_(0)
    if (diff <= tol).all():
        return None
    i, j = (int(v) for v in torch.unravel_index(diff.argmax(), diff.shape))
    return (
        f"{name}: the correlation between {labels(i)} and {labels(j)} is {got[i, j].item():.2f}, "
        f"expected {want[i, j].item():.2f} (± {tol:.2f})"
    )


def fresh_randomness_problem(fn: Callable, *args: Any, **kwargs: Any) -> str | None:
    """Two calls with the same arguments must give different draws (no reseeding inside)."""
    state = torch.get_rng_state()
    first = fn(*args, **kwargs)
    second = fn(*args, **kwargs)
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.shape == second.shape and torch.equal(first, second):
            return (
                "two calls with the same arguments returned exactly the same batch: do not call "
                "torch.manual_seed (or build a seeded Generator) inside the function; draw from "
                "the global random state so that every call gives fresh data"
            )
    del state
    return None


def dtype_problem(expected: torch.Tensor, actual: Any, path: str = "output") -> str | None:
    """Float precision must match (float64 where float32 is expected breaks later matmuls)."""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        if actual.dtype != expected.dtype:
            return (
                f"{path} has dtype {actual.dtype}, expected {expected.dtype} (torch's default); "
                "mixing them makes later matmuls fail. Avoid numpy / `dtype=torch.float64`"
            )
    return None


# ----------------------------------------------------------------------------- training loops


def fingerprint(batch: Any) -> float:
    """A number that identifies a batch (same batch, same number)."""
    tensors = [t for t in _tensors_in(batch) if t.numel()]
    return (
        float(
            sum(
                t.double()
                .flatten()[:4096]
                .mul(torch.arange(1, min(t.numel(), 4096) + 1, dtype=torch.float64))
                .sum()
                for t in tensors
            )
        )
        if tensors
        else 0.0
    )


class StepRecorder:
    """Records what every ``optimizer.step()`` (of any torch optimizer) sees while active.

    Per step: the learning rate of the first param group (``lr applied``), the total gradient
    norm and the largest |gradient| at the moment of the step, the gradient norm of each named
    parameter, and the index of the last batch drawn through :meth:`saw`::

        rec = StepRecorder({id(p): n for n, p in model.named_parameters()})
        with rec:
            train(model, batches=lambda: rec.saw(next(it)))
        rec.steps  # list of dicts, one per optimizer.step()
    """

    def __init__(self, names: dict[int, str] | None = None):
        self.names = names or {}
        self.steps: list[dict[str, Any]] = []
        self.draws: list[float] = []

    def saw(self, batch: Any) -> Any:
        self.draws.append(fingerprint(batch))
        return batch

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad.detach().double() for p in params if p.grad is not None]
        norm = float(torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()) if grads else 0.0
        biggest = float(max(g.abs().max() for g in grads)) if grads else 0.0
        per_param = {
            self.names.get(id(p), f"parameter {i}"): (
                0.0 if p.grad is None else float(p.grad.detach().double().norm())
            )
            for i, p in enumerate(params)
        }
        batch = len(self.draws) - 1
        self.steps.append(
            {
                "lr applied": float(optimizer.param_groups[0]["lr"]),
                "grad norm": norm,
                "max |grad|": biggest,
                "grad norms": per_param,
                "batch": batch,
                "batch fingerprint": self.draws[batch] if batch >= 0 else None,
            }
        )

    def __enter__(self) -> StepRecorder:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def _close(a: float, b: float, rtol: float, atol: float = 1e-12) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def step_divergence(
    expected: list[dict],
    actual: list[dict],
    grad_clip: float | None = None,
    grad_rtol: float = 1e-3,
    scale_free: bool = False,
    grad_steps: int = 5,
) -> str | None:
    """Name the first optimizer step and quantity where a learner's loop leaves the reference's.

    Quantities, in the order a step uses them: the batch seen, the learning rate applied, the
    gradient at ``optimizer.step()``. Messages come with the usual cause of each pattern: lr one
    step late, lr recorded but not applied, a batch reused, clipping by value or after the step,
    zero_grad() between backward() and step(), gradients accumulated. With ``scale_free`` the
    gradients may differ from the reference's by one constant positive factor (a loss averaged
    instead of summed trains the same under Adam). Gradients are compared on the first
    ``grad_steps`` steps only: every mistake above shows there, while later steps of a correct
    but differently rounded (or rescaled) loop drift apart slowly.
    """
    scale = 1.0
    if scale_free:
        for t, (want, got) in enumerate(zip(expected, actual, strict=False)):
            if want["grad norm"] > 0 and got["grad norm"] > 0:
                scale = got["grad norm"] / want["grad norm"]
                for name, w in want["grad norms"].items():
                    g = got["grad norms"].get(name, 0.0)
                    if not _close(g, scale * w, grad_rtol, 1e-9):
                        return (
                            f"at step {t} the gradient of `{name}` reaching optimizer.step() is "
                            f"{g:.4g}, the reference's is {w:.4g} (after allowing one overall "
                            f"scale factor, {scale:.3g}, for the whole loss): the loss you "
                            "back-propagate is not the reference's"
                        )
                break
    if not actual and expected:
        return (
            "optimizer.step() was never called, so the weights never changed: call it after "
            "loss.backward() every step"
        )
    for t, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if got["batch"] != want["batch"] or (
            got["batch fingerprint"] is not None
            and want["batch fingerprint"] is not None
            and not _close(got["batch fingerprint"], want["batch fingerprint"], 1e-6)
        ):
            if t > 0 and got["batch"] == actual[t - 1]["batch"]:
                return (
                    f"step {t} (counting from 0) trained on the same batch as step {t - 1}: a batch "
                    "was reused. Draw a fresh batch inside the loop, once per step"
                )
            return (
                f"step {t} (counting from 0): the batch in use is batch #{got['batch']} drawn, "
                f"the reference uses #{want['batch']}: draw exactly one batch per step, before "
                "the forward pass"
            )
        if not _close(got["lr applied"], want["lr applied"], 1e-5):
            late = t + 1 < len(expected) and all(
                _close(a["lr applied"], w["lr applied"], 1e-5)
                for a, w in zip(actual[t + 1 :], expected[t:], strict=False)
            )
            if t == 0 or late:
                if late:
                    return (
                        f"the learning rate applied at step {t} is {got['lr applied']:.4g}, the "
                        f"schedule's value is {want['lr applied']:.4g}, and every later step uses "
                        "the rate of the step before: the rate is applied one step late. Set "
                        "`group['lr']` for this step BEFORE `optimizer.step()` (at the top of the "
                        "loop), with this step's index"
                    )
            return (
                f"the learning rate applied at optimizer.step() of step {t} is "
                f"{got['lr applied']:.4g}, the schedule gives {want['lr applied']:.4g}: set every "
                "param group's `lr` (`for group in optimizer.param_groups: group['lr'] = ...`) "
                "before calling `optimizer.step()`"
            )
        if t >= grad_steps:
            continue
        if want["grad norm"] > 0 and got["grad norm"] == 0:
            return (
                f"at step {t} the gradients were all zero (or None) when optimizer.step() ran: "
                "zero_grad() must come BEFORE loss.backward(), not between backward() and step()"
            )
        if not _close(got["grad norm"], scale * want["grad norm"], grad_rtol, 1e-9):
            message = (
                f"at step {t} the gradient norm reaching optimizer.step() is "
                f"{got['grad norm']:.4g}, the reference's is {want['grad norm']:.4g}"
            )
            if grad_clip is not None and want["grad norm"] <= grad_clip * (1 + 1e-4):
                # Clipping by value leaves its mark: the largest entries sit at exactly
                # ±grad_clip. Any gradient whose entries are all small (unclipped, or clipped
                # after the step) is merely "within ±grad_clip", which says nothing.
                at_clip = abs(got["max |grad|"] - grad_clip) <= 1e-4 * grad_clip
                if at_clip and got["grad norm"] > grad_clip * (1 + 1e-4):
                    return message + (
                        ": its largest entries sit at exactly ±grad_clip but the norm is above "
                        "grad_clip, so you clipped by VALUE. Clip the total norm: "
                        "torch.nn.utils.clip_grad_norm_(params, grad_clip)"
                    )
                message += (
                    ": the gradients were not clipped before the step. Call "
                    "torch.nn.utils.clip_grad_norm_(params, grad_clip) between backward() and "
                    "step()"
                )
                if got["max |grad|"] <= grad_clip:
                    message += (
                        " (every entry is already within ±grad_clip here, so clipping each entry "
                        "by value would change nothing: it is the total norm that must be clipped)"
                    )
                return message
            previous_ok = t > 0 and _close(
                actual[t - 1]["grad norm"], scale * expected[t - 1]["grad norm"], grad_rtol, 1e-9
            )
            if previous_ok and got["grad norm"] > 1.3 * scale * want["grad norm"]:
                message += " (larger: are gradients accumulating? zero_grad() before backward())"
            worst = max(
                want["grad norms"],
                key=lambda k: (
                    abs(got["grad norms"].get(k, 0.0) - scale * want["grad norms"][k])
                    / (abs(want["grad norms"][k]) + 1e-12)
                ),
            )
            if not _close(
                got["grad norms"].get(worst, 0.0),
                scale * want["grad norms"][worst],
                grad_rtol,
                1e-9,
            ):
                message += (
                    f"; the gradient of `{worst}` differs most ({got['grad norms'].get(worst, 0.0):.4g}"
                    f" vs {want['grad norms'][worst]:.4g})"
                )
            return message
    if len(actual) != len(expected):
        return f"optimizer.step() was called {len(actual)} times, expected {len(expected)}"
    return None
