"""The ``course`` command: list, check, report, hub-link, build, doctor, execute, new.

Every user-facing error is one line on stderr and a non-zero exit, never a library traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from course_utils.machinery.chapters import (
    CHAPTERS,
    Chapter,
    UnknownChapterError,
    exercise_path,
    get_chapter,
    repo_root,
    solution_path,
)

KERNEL_NAME = "mi-course"


def _leave_now(code: int) -> None:
    """Exit at once after Ctrl-C or SIGTERM: the kernels are gone and whatever was saved is whole
    (atomic writes), but an ordinary exit takes one to two seconds more (the abandoned kernel
    client's sockets linger; the worker pool and torch wind down)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class UserError(Exception):
    """An error a learner can fix; printed as one line."""


def _chapter_and_path(target: str, folder: str = "notebooks") -> tuple[Chapter, Path]:
    """Accept a chapter ("1", "01", a slug) or a path to a notebook whose name starts with NN_."""
    as_path = Path(target)
    if as_path.is_file() and as_path.suffix != ".ipynb":
        raise UserError(f"{as_path} is not a notebook: pass a chapter number or an .ipynb file.")
    if target.endswith(".ipynb") or as_path.is_file():
        if not as_path.exists():
            raise UserError(
                f"{as_path} does not exist. Check the path (notebooks live in notebooks/)."
            )
        prefix = as_path.name.split("_", 1)[0]
        if not prefix.isdigit():
            raise UserError(
                f"cannot tell the chapter of {as_path.name!r}: notebook names start with the chapter "
                "number, e.g. 01_toy_models_of_superposition.ipynb."
            )
        from course_utils.machinery.grading import MOVED_CHAPTERS

        new, slug = MOVED_CHAPTERS.get(prefix, (prefix, None))
        if slug is not None and as_path.stem.startswith(f"{prefix}_{slug}"):
            prefix = new  # a notebook saved before its chapter was renumbered
        return get_chapter(prefix), as_path
    chapter = get_chapter(target)
    root = repo_root()
    if not solution_path(chapter, root).exists():
        raise UserError(f"chapter {chapter.number} is not released yet (see `course list`).")
    path = (exercise_path if folder == "notebooks" else solution_path)(chapter, root)
    if not path.exists():
        raise UserError(
            f"{path} is missing. Restore it with `git checkout -- {folder}/{chapter.filename}` "
            "or regenerate the exercise notebooks with `course build`."
        )
    return chapter, path


def cmd_list(args: argparse.Namespace) -> int:
    from course_utils.machinery.grading import ProgressUnreadable, progress_path, read_progress

    try:
        progress = read_progress(progress_path())
    except ProgressUnreadable as why:
        progress = {}
        print(
            f"course: {progress_path()} cannot be read ({why}); it is left as it is, and the next "
            "`course check` keeps it aside under another name before saving.",
            file=sys.stderr,
        )
    try:
        root = repo_root()
    except FileNotFoundError:
        root = None
    print(f"{'#':3} {'chapter':42} {'time':8} progress")
    for c in CHAPTERS:
        if root is not None and not solution_path(c, root).exists():
            state = "coming soon"
        elif c.number in progress:
            results = progress[c.number]["results"]
            passed = sum(r["status"] == "passed" for r in results)
            state = f"{passed}/{len(results)} exercises passed ({progress[c.number]['checked_at']})"
        else:
            state = "not checked yet — `course check " + c.number + "`"
        print(f"{c.number:3} {c.title:42} {c.learner_time:8} {state}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from course_utils.machinery.build import BuildError
    from course_utils.machinery.grading import (
        chapter_summary,
        exit_code,
        grade_notebook,
        render_table,
        save_progress,
    )

    chapter, path = _chapter_and_path(args.target)
    print(f"Checking {path} (chapter {chapter.number}: {chapter.title}) ...", flush=True)
    start = time.perf_counter()
    try:
        grading = grade_notebook(
            path, chapter, cell_timeout=args.cell_timeout, notebook_timeout=args.timeout
        )
    except BuildError as error:
        raise UserError(str(error)) from None
    results = grading.results
    print(render_table(results))
    summary = chapter_summary(chapter, results)
    if summary:
        print(summary)
    if grading.sentence:
        print(grading.sentence[0].upper() + grading.sentence[1:])
    if grading.other_error:
        print("! " + grading.other_error[0].upper() + grading.other_error[1:])
    print(f"({time.perf_counter() - start:.0f} s)")
    if not args.no_save:
        saved = save_progress(chapter, results)
        if saved.kept_aside:
            print(
                f"Your progress file could not be read ({saved.why}): it is kept as "
                f"{saved.kept_aside} and a new one was started with this chapter."
            )
        if saved.path:
            print(f"progress saved to {saved.path} (see `course list`)")
        else:
            print(
                f"progress not saved: no writable place for it ({saved.error}); set COURSE_HOME "
                "to a folder you can write to."
            )
    code = exit_code(results)
    if code and all(r.status == "not attempted" for r in results):
        print("Nothing attempted yet: fill in the first exercise and run `course check` again.")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from course_utils.machinery.report import available_cores, find_submissions, run_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass the folder that holds the submissions.")
    out = Path(args.out)
    if not find_submissions(folder, exclude=out):
        raise UserError(f"no .ipynb files under {folder}: nothing to grade.")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"-j {args.jobs}: the number of parallel kernels must be at least 1.")
    jobs = args.jobs or available_cores()
    print(f"Grading the notebooks under {folder} with {jobs} kernel(s) in parallel ...", flush=True)
    try:
        subs, seconds = run_report(
            folder, out, jobs, cell_timeout=args.cell_timeout, notebook_timeout=args.timeout
        )
    except KeyboardInterrupt as stop:
        how = getattr(stop, "signal_name", "Ctrl-C")
        print(
            f"\ninterrupted ({how}): every notebook graded so far is cached in "
            f"{out / '.cache'}; run the same command again to go on from there."
        )
        _leave_now(getattr(stop, "exit_code", 130))
    broken = sum(1 for s in subs if s.error or not s.chapter)
    reused = len({s.key for s in subs if s.cached})
    graded = len({s.key for s in subs if s.key and not s.cached})
    print(
        f"{len(subs)} notebooks, {len(subs) - broken} with results and {broken} that could not be "
        f"graded; distinct notebooks: {graded} graded now, {reused} reused from the cache "
        f"({seconds:.0f} s)"
    )
    print(f"wrote {out / 'report.csv'} and {out / 'report.html'}")
    return 0


def cmd_hub_link(args: argparse.Namespace) -> int:
    from course_utils.machinery.hub import nbgitpuller_link

    try:
        print(nbgitpuller_link(args.hub, args.repo, args.branch, args.open, args.interface))
    except ValueError as error:
        raise UserError(str(error)) from None
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from course_utils.machinery.build import build_all

    stale = build_all(check_only=args.check)
    if args.check:
        for path in stale:
            print(f"stale: {path} — run `course build` (or `make build`) and commit the result")
        return 1 if stale else 0
    for path in stale:
        print(f"wrote {path}")
    print("exercise notebooks are up to date" if not stale else f"{len(stale)} notebook(s) rebuilt")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    """The replication table, from the executed solution notebooks (docs/replications.md)."""
    from course_utils.machinery import claims

    root = repo_root()
    collected = claims.collect_course(root)
    if args.chapter is not None:
        number = get_chapter(args.chapter).number
        collected = {number: collected.get(number, [])}
    print(claims.text_report(collected))
    return 0


def cmd_execute(args: argparse.Namespace) -> int:
    """Run solution notebooks in place (outputs kept), then rebuild the exercise notebooks."""
    import nbformat

    from course_utils.machinery.build import (
        NOTEBOOK_METADATA,
        build_all,
        notebook_text,
        read_notebook,
    )
    from course_utils.machinery.grading import _write_atomically, run_notebook

    targets = [_chapter_and_path(t, "solutions") for t in args.chapters]
    for chapter, path in targets:
        notebook = read_notebook(path)
        start = time.perf_counter()
        fault = run_notebook(notebook, path.parent, args.timeout, allow_errors=False)
        if fault is not None:
            raise UserError(f"{path} was not rewritten: {fault['sentence']}")
        seconds = time.perf_counter() - start
        notebook.metadata = nbformat.from_dict(NOTEBOOK_METADATA)
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
        # stored as JupyterLab saves it, so opening the notebook there changes no byte; atomically,
        # so that an interrupted run leaves the old notebook, never half of the new one
        _write_atomically(path, notebook_text(notebook))
        verdict = "within" if seconds <= chapter.cpu_budget_s else "OVER"
        print(f"{path}: ran in {seconds:.0f} s ({verdict} the {chapter.cpu_budget_s} s budget)")
    build_all()
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    import nbformat

    from course_utils.machinery.build import NOTEBOOK_METADATA, notebook_text
    from course_utils.machinery.colab import badge, setup_cell_source

    chapter = get_chapter(args.chapter)
    path = solution_path(chapter, repo_root())
    if path.exists():
        raise UserError(f"{path} exists already; edit it instead.")
    nb = nbformat.v4.new_notebook(metadata=NOTEBOOK_METADATA)
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            f"{badge('solutions/' + chapter.filename)}\n\n# {chapter.number} — {chapter.title}\n\n"
            f"*Learner time: {chapter.learner_time}.*"
        ),
        nbformat.v4.new_code_cell(setup_cell_source()),
        nbformat.v4.new_code_cell(
            "from course_utils import setup_notebook\n"
            f"from course_utils.checks import ch{chapter.number} as check\n\nsetup_notebook(seed=0)"
        ),
    ]
    path.write_text(notebook_text(nb), encoding="utf-8")
    print(f"created {path}; write course_utils/checks/ch{chapter.number}.py next")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    from course_utils.machinery.env import (
        env_report,
        network_available,
        offline_forced,
        package_version,
    )

    print(env_report())
    print(f"python      {sys.executable} ({platform.python_version()})")
    for name in (
        "torch",
        "transformer_lens",
        "sae_lens",
        "plotly",
        "ipywidgets",
        "jupyterlab",
        "nbval",
    ):
        print(f"{name:11} {package_version(name)}")
    from course_utils.machinery.env import get_device, in_colab
    from course_utils.science import corpus

    where = "Colab" if in_colab() else "this machine"
    print(
        f"runs on     {where}, Python {platform.python_version()} (the course supports 3.11-3.13)"
    )
    cuda = torch.cuda.is_available()
    device = get_device()
    gpu = f"; GPU {torch.cuda.get_device_name(0)} " if cuda else ""
    gpu += (
        "in use (COURSE_DEVICE=cuda)"
        if device.type == "cuda"
        else "present but unused: numbers match the solutions on the CPU; COURSE_DEVICE=cuda opts in"
        if cuda
        else ""
    )
    print(
        f"device      {device.type} ({os.cpu_count()} cores, torch uses "
        f"{torch.get_num_threads()} threads){gpu}"
    )
    try:
        corpus.list_files()
        print(
            f"corpus      shipped snapshot of CPython {corpus.SOURCE_PYTHON}'s standard library, "
            "fingerprint checked (the same on every Python)"
        )
    except corpus.CorpusArchiveError as error:
        print(f"corpus      BROKEN: {error}")
    if offline_forced():
        print(
            "network     offline by request (HF_HUB_OFFLINE=1 or COURSE_OFFLINE=1): default path only"
        )
    else:
        online = network_available()
        print(
            "network     "
            + (
                "online: the optional GPT-2 / pretrained-SAE paths can download"
                if online
                else "not reachable (fine: only the optional online bonus sections need it)"
            )
        )
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()
        registered = KERNEL_NAME in specs
    except Exception:  # jupyter not installed (e.g. a bare pip install)
        registered = False
    print(
        f"kernel      {KERNEL_NAME!r} "
        + (
            "registered"
            if registered
            else "not registered — `make lab` registers it (or `python -m ipykernel install --user "
            f"--name {KERNEL_NAME}`)"
        )
    )
    try:
        from course_utils.machinery.build import build_all

        stale = build_all(check_only=True)
        print(
            "notebooks   "
            + ("up to date" if not stale else f"{len(stale)} stale — run `course build`")
        )
    except FileNotFoundError:
        print("notebooks   no course checkout here (fine in Colab)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="course", description="The mechanistic-interpretability course."
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="chapters, learner time and your progress").set_defaults(
        fn=cmd_list
    )
    check = sub.add_parser("check", help="run your exercise notebook and report every exercise")
    check.add_argument(
        "target",
        help="chapter number (e.g. 07: checks notebooks/07_*.ipynb) or a path to a notebook whose "
        "file name starts with the chapter number and an underscore (07_mine.ipynb works, "
        "'Copy of 07_....ipynb' does not: rename it)",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds allowed for the whole notebook (default 1800)",
    )
    check.add_argument(
        "--cell-timeout",
        type=float,
        default=600,
        help="seconds allowed per cell; a cell still running then is named and stopped "
        "(default 600)",
    )
    check.add_argument("--no-save", action="store_true", help="do not record progress")
    check.set_defaults(fn=cmd_check)
    report = sub.add_parser(
        "report", help="(facilitators) grade a folder of learners' notebooks into one table"
    )
    report.add_argument("folder", help="folder of submitted notebooks (any names, any chapters)")
    report.add_argument(
        "-o",
        "--out",
        default="course-report",
        help="where report.csv, report.html and the cache go (default: ./course-report)",
    )
    report.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        help="notebooks graded at once, one kernel each (default: the cores this process may use)",
    )
    report.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed per notebook (default 1800)"
    )
    report.add_argument(
        "--cell-timeout", type=int, default=600, help="seconds allowed per cell (default 600)"
    )
    report.set_defaults(fn=cmd_report)
    hub = sub.add_parser(
        "hub-link", help="(facilitators) the nbgitpuller link that gives each learner a copy"
    )
    hub.add_argument(
        "--hub", required=True, help="your JupyterHub's address, https://hub.example.org"
    )
    hub.add_argument("--repo", default=None, help="the course's git repository (default: upstream)")
    hub.add_argument("--branch", default="main")
    hub.add_argument(
        "--open",
        default="notebooks/00_setup_and_tools.ipynb",
        help="the file to open after the pull, relative to the repository",
    )
    hub.add_argument("--interface", choices=("lab", "tree"), default="lab")
    hub.set_defaults(fn=cmd_hub_link)
    build = sub.add_parser("build", help="regenerate notebooks/ from solutions/")
    build.add_argument("--check", action="store_true", help="only report stale notebooks")
    build.set_defaults(fn=cmd_build)
    claims = sub.add_parser(
        "claims", help="what the course replicates: every claim beside a paper's number"
    )
    claims.add_argument("chapter", nargs="?", default=None, help="one chapter (default: all)")
    claims.set_defaults(fn=cmd_claims)
    run = sub.add_parser("execute", help="(authors) run solution notebooks in place, then build")
    run.add_argument("chapters", nargs="+")
    run.add_argument(
        "--timeout", type=float, default=900, help="seconds allowed per cell (default 900)"
    )
    run.set_defaults(fn=cmd_execute)
    new = sub.add_parser("new", help="(authors) start a solution notebook for a chapter")
    new.add_argument("chapter")
    new.set_defaults(fn=cmd_new)
    sub.add_parser("doctor", help="versions, device, network, kernel").set_defaults(fn=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    from course_utils.machinery.grading import raise_on_sigterm, stop_kernels

    args = parser().parse_args(argv)
    raise_on_sigterm()  # SIGTERM ends a command as Ctrl-C does (exit 143 instead of 130)
    try:
        return args.fn(args)
    except KeyboardInterrupt as stop:
        stop_kernels()
        how = getattr(stop, "signal_name", "Ctrl-C")
        kept = {
            "check": "nothing was saved (progress saved earlier is kept)",
            "execute": "notebooks not yet rewritten are as they were",
        }.get(args.command, "nothing was left half-written")
        print(
            f"\ncourse {args.command}: interrupted ({how}); the kernel was shut down and {kept}.",
            file=sys.stderr,
        )
        _leave_now(getattr(stop, "exit_code", 130))
    except (UserError, UnknownChapterError, FileNotFoundError) as error:
        print(f"course: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from course_utils.machinery.build import BuildError

        if isinstance(error, BuildError):
            print(f"course: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
