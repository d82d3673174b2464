"""``python -m course_utils.assets build|evaluate|info|build-saes|build-mlp-saes|build-transcoders|build-transcoder-pareto|build-e2e|build-e2e-plateau|build-clt|build-bilinear-lm|build-sae-pareto|freeze-corpus``: rebuild or inspect the assets."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _timed(what: str, build) -> int:
    """Run one asset build, printing its log lines and its wall time."""
    start = time.perf_counter()
    print(f"building {what}", flush=True)
    build(lambda line: print(line, flush=True))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="retrain tokenizer and model from the corpus")
    build.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    build.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    build.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    evaluate = sub.add_parser("evaluate", help="re-measure the shipped (or --dir) model")
    evaluate.add_argument("--dir", type=Path, default=None)
    evaluate.add_argument("--write", action="store_true", help="store the result in metadata.json")
    info = sub.add_parser("info", help="print the numbers recorded in metadata.json")
    info.add_argument("--dir", type=Path, default=None)
    saes = sub.add_parser("build-saes", help="retrain the shipped reference SAEs (chapter 03)")
    saes.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    saes.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    saes.add_argument("--threads", type=int, default=2)
    mlp_saes = sub.add_parser(
        "build-mlp-saes",
        help="retrain the capstone's SAEs on the layer-0 MLP neurons (float16, chapter 11)",
    )
    mlp_saes.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    mlp_saes.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    mlp_saes.add_argument("--threads", type=int, default=2)
    tcs = sub.add_parser(
        "build-transcoders", help="retrain the shipped transcoders and MLP-out SAEs (chapter 05)"
    )
    tcs.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    tcs.add_argument("--steps", type=int, default=None, help="training steps (default 800)")
    tcs.add_argument("--threads", type=int, default=2)
    pareto_tc = sub.add_parser(
        "build-transcoder-pareto",
        help="rerun chapter 05's Pareto sweep (3 families x 2 seeds, then a training-length dose-response)",
    )
    pareto_tc.add_argument("--out", type=Path, default=None, help="CSV (default: shipped)")
    pareto_tc.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    pareto_tc.add_argument("--threads", type=int, default=1)
    e2e = sub.add_parser(
        "build-e2e", help="rerun the chapter-04 lambda sweep (local / e2e / e2e+ds SAEs)"
    )
    e2e.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    e2e.add_argument("--table", type=Path, default=None, help="sweep table (default: shipped)")
    e2e.add_argument("--steps", type=int, default=None, help="training steps (default 800)")
    e2e.add_argument("--threads", type=int, default=1)
    plateau = sub.add_parser(
        "build-e2e-plateau",
        help="chapter 04's training-length study: local and e2e at 800, 3200 and 12800 steps, 2 seeds",
    )
    plateau.add_argument("--table", type=Path, default=None, help="JSON (default: shipped)")
    plateau.add_argument("--threads", type=int, default=1)
    plateau.add_argument(
        "--steps", type=int, nargs="+", default=None, help="training lengths (default 800 3200 12800)"
    )
    plateau.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="save progress here; rerun the same command to resume after a stop",
    )
    freeze = sub.add_parser(
        "freeze-corpus",
        help="re-make the shipped corpus snapshot from a Python 3.11.7 standard library",
    )
    freeze.add_argument(
        "--stdlib", type=Path, default=None, help="Lib/ folder (default: this Python's)"
    )
    freeze.add_argument("--out", type=Path, default=None, help="archive (default: shipped)")
    clt = sub.add_parser(
        "build-clt", help="retrain the shipped cross-layer transcoder and its sweep (chapter 07)"
    )
    clt.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    clt.add_argument("--steps", type=int, default=None, help="training steps (default 500)")
    clt.add_argument("--threads", type=int, default=2)
    blm = sub.add_parser(
        "build-bilinear-lm",
        help="retrain the one-layer bilinear LM and its GELU twin (chapter 08, section 4)",
    )
    blm.add_argument("--out", type=Path, default=None, help="output folder (default: shipped)")
    blm.add_argument("--steps", type=int, default=None, help="training steps (default 4800)")
    blm.add_argument(
        "--checkpoints",
        type=str,
        default=None,
        help="comma-separated steps at which to measure held-out loss (default: the shipped ones "
        "up to --steps, plus --steps)",
    )
    blm.add_argument(
        "--no-saes",
        action="store_true",
        help="train only the twins, not the SAEs (e.g. a second seed whose weights are not shipped)",
    )
    blm.add_argument("--seed", type=int, default=0, help="seed of both twins (default 0)")
    blm.add_argument(
        "--kinds",
        type=str,
        default=None,
        help="comma-separated twins to train (default: bilinear,gelu). Each twin's start and "
        "batches depend only on --seed, so training them in two processes (two cores) gives the "
        "same weights as side by side; record both folders with --record-run A B",
    )
    blm.add_argument(
        "--saes-only", action="store_true", help="only retrain the two SAEs on the shipped model"
    )
    blm.add_argument(
        "--record-run",
        type=Path,
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="add the finished build in FOLDER (e.g. another seed or budget, built with --out) to "
        "runs.json in --out (default: shipped) under --label, without its weights; give one "
        "folder per twin when the twins were trained in separate processes with --kinds",
    )
    blm.add_argument("--label", type=str, default=None, help="the run's label for --record-run")
    blm.add_argument("--note", type=str, default="", help="a sentence on the run for --record-run")
    blm.add_argument("--threads", type=int, default=1)
    pareto = sub.add_parser(
        "build-sae-pareto",
        help="rerun the chapter-10 sweep: 5 SAE architectures x 3 sparsities on one layer",
    )
    pareto.add_argument("--out", type=Path, default=None, help="CSV (default: shipped)")
    pareto.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    pareto.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    if args.command == "build-sae-pareto":
        from course_utils.science import sae_eval

        out = args.out or Path(__file__).parent / "saes" / sae_eval.PARETO_TABLE
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            "the chapter-10 SAE sweep",
            lambda log: sae_eval.build_pareto_table(out, recipe, log=log, threads=args.threads),
        )

    if args.command == "build-bilinear-lm":
        from course_utils.science import bilinear_lm

        out = args.out if args.out is not None else bilinear_lm.asset_dir()
        if args.record_run is not None:
            if not args.label:
                parser.error("--record-run needs --label (e.g. 'seed 1, 4800 steps')")
            return _timed(
                f"the record of {' + '.join(map(str, args.record_run))} in {out / bilinear_lm.RUNS_FILE}",
                lambda log: bilinear_lm.record_run(args.record_run, args.label, args.note, out),
            )
        if args.saes_only:
            return _timed(
                f"the bilinear model's SAEs into {out}",
                lambda log: bilinear_lm.build_saes(bilinear_lm.BilinearSAEConfig(), out, log=log),
            )
        config = bilinear_lm.BilinearLMConfig(threads=args.threads, seed=args.seed)
        if args.kinds is not None:
            kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
            unknown = sorted(set(kinds) - set(bilinear_lm.KINDS))
            if not kinds or unknown:
                parser.error(f"--kinds takes some of {','.join(bilinear_lm.KINDS)}; got {args.kinds}")
            config.kinds = kinds
        if args.steps is not None:
            config.steps = args.steps
            kept = {c for c in config.checkpoints if c < args.steps} | {args.steps}
            config.checkpoints = tuple(sorted(kept))
        if args.checkpoints is not None:
            try:
                asked = {int(c) for c in args.checkpoints.split(",") if c.strip()}
            except ValueError:
                parser.error("--checkpoints takes comma-separated step numbers, e.g. 400,800,1600")
            if not asked or min(asked) < 1 or max(asked) > config.steps:
                parser.error(f"--checkpoints must lie between 1 and --steps ({config.steps})")
            config.checkpoints = tuple(sorted(asked | {config.steps}))
        return _timed(
            f"{bilinear_lm.ASSET_NAME} ({', '.join(config.kinds)}) into {out}",
            lambda log: (
                bilinear_lm.build(config, out, log=log),
                None
                if args.no_saes
                else bilinear_lm.build_saes(bilinear_lm.BilinearSAEConfig(), out, log=log),
            ),
        )

    if args.command == "freeze-corpus":
        from course_utils.science import corpus

        root = args.stdlib if args.stdlib is not None else corpus.stdlib_root()
        out = args.out if args.out is not None else corpus.ARCHIVE
        fingerprint = corpus.freeze(root, out)
        same = fingerprint == corpus.FINGERPRINT
        print(f"wrote {out} from {root}: fingerprint {fingerprint}")
        print(
            "identical to the shipped snapshot"
            if same
            else f"DIFFERS from the snapshot the model was trained on ({corpus.FINGERPRINT}); the "
            f"course expects the CPython {corpus.SOURCE_PYTHON} standard library"
        )
        return 0 if same else 1

    if args.command == "build-clt":
        from course_utils.science import clt as clt_module

        out = args.out if args.out is not None else clt_module.asset_dir()
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            f"{clt_module.SHIPPED_NAME} and {clt_module.SWEEP_TABLE} into {out}",
            lambda log: clt_module.build_reference_clt(out, recipe, log=log, threads=args.threads),
        )

    if args.command == "build-e2e":
        from course_utils.assets import ASSETS_DIR
        from course_utils.science import e2e_saes
        from course_utils.science.models import SAE_ASSETS

        out = args.out if args.out is not None else ASSETS_DIR / SAE_ASSETS
        table = args.table if args.table is not None else ASSETS_DIR / "e2e" / e2e_saes.TABLE_FILE
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            f"sweep into {table}; shipping {', '.join(e2e_saes.SHIPPED.values())} into {out}",
            lambda log: e2e_saes.build_e2e(out, table, recipe, log=log, threads=args.threads),
        )

    if args.command == "build-e2e-plateau":
        from course_utils.assets import ASSETS_DIR
        from course_utils.science import e2e_saes

        table = args.table or ASSETS_DIR / "e2e" / e2e_saes.PLATEAU_FILE
        return _timed(
            f"the chapter-04 plateau study into {table}",
            lambda log: e2e_saes.build_plateau(
                table,
                {"steps": args.steps} if args.steps else None,
                log=log,
                threads=args.threads,
                state_dir=args.state_dir,
            ),
        )

    if args.command == "build-transcoder-pareto":
        from course_utils.assets import ASSETS_DIR
        from course_utils.science import transcoders
        from course_utils.science.models import SAE_ASSETS

        out = args.out or ASSETS_DIR / SAE_ASSETS / transcoders.PARETO_TABLE
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            f"the chapter-05 Pareto sweep into {out}",
            lambda log: transcoders.build_transcoder_pareto(
                out, recipe, log=log, threads=args.threads
            ),
        )

    if args.command == "build-transcoders":
        from course_utils.assets import ASSETS_DIR
        from course_utils.science import transcoders
        from course_utils.science.models import SAE_ASSETS

        out = args.out if args.out is not None else ASSETS_DIR / SAE_ASSETS
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            f"{', '.join(transcoders.REFERENCE_NAMES.values())} into {out}",
            lambda log: transcoders.build_reference_transcoders(
                out, recipe, log=log, threads=args.threads
            ),
        )

    if args.command == "build-mlp-saes":
        from course_utils.assets import ASSETS_DIR
        from course_utils.science import lm_saes
        from course_utils.science.models import SAE_ASSETS

        out = args.out if args.out is not None else ASSETS_DIR / SAE_ASSETS
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            f"{', '.join(lm_saes.MLP_REFERENCE_NAMES)} into {out}",
            lambda log: lm_saes.build_reference_saes(
                out,
                recipe,
                log=log,
                threads=args.threads,
                names=lm_saes.MLP_REFERENCE_NAMES,
                base=lm_saes.MLP_REFERENCE,
                weights_dtype=lm_saes.MLP_WEIGHTS_DTYPE,
            ),
        )

    if args.command == "build-saes":
        from course_utils.assets import ASSETS_DIR
        from course_utils.science import lm_saes
        from course_utils.science.models import SAE_ASSETS

        out = args.out if args.out is not None else ASSETS_DIR / SAE_ASSETS
        recipe = {} if args.steps is None else {"steps": args.steps}
        return _timed(
            f"{', '.join(lm_saes.REFERENCE_NAMES)} into {out}",
            lambda log: lm_saes.build_reference_saes(out, recipe, log=log, threads=args.threads),
        )

    from course_utils.science import course_model as cm

    if args.command == "build":
        config = cm.BuildConfig()
        if args.steps is not None:
            config.steps = args.steps
        if args.threads is not None:
            config.threads = args.threads
        out = args.out if args.out is not None else cm.asset_dir()
        print(f"building {cm.MODEL_NAME} into {out}", flush=True)
        cm.build(config, out, log=lambda line: print(line, flush=True))
        return 0
    if args.command == "evaluate":
        import torch

        from course_utils.science.activations import corpus_stream

        start = time.perf_counter()
        model = cm.load_course_model(args.dir)
        print(f"load time {time.perf_counter() - start:.2f} s", flush=True)
        torch.set_num_threads(2)
        backend = model.tokenizer.backend_tokenizer
        result = cm.evaluate(
            model, corpus_stream(backend, "train"), corpus_stream(backend, "validation")
        )
        metadata = cm.read_metadata(args.dir)
        metadata["evaluation"] = result
        if args.write:
            path = (args.dir or cm.asset_dir()) / cm.METADATA_FILE
            path.write_text(json.dumps(metadata, indent=2) + "\n")
        print(cm.format_report(metadata))
        return 0
    metadata = cm.read_metadata(args.dir)
    print(cm.format_report(metadata))
    print(json.dumps({k: metadata[k] for k in ("first_losses", "files_sha256") if k in metadata}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
