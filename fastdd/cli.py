"""The ``fastdd`` command line: ``distill``, ``value``, ``prune``, ``bench`` and ``demo``.

Every subcommand reads the bundled digits unless ``--data PATH`` names a ``.npz`` / ``.pt``
file with arrays ``X`` and ``y`` (see :mod:`fastdd.data.files`), writes what it makes to
the file given by ``--out``, and takes ``--seed``. Long runs show progress bars; ``distill``
and ``value --method tmc`` checkpoint and continue with ``--resume``. Mistakes a person can
fix (a missing file, a wrong format, an option out of range) end with a one-line message
and exit status 2, without a traceback.

    fastdd distill --method dm --ipc 10 --out syn.pt
    fastdd value --method knn --out values.csv
    fastdd prune --keep 0.5 --out kept.npy
    python -m fastdd demo --only distillation
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int):
    """An argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


# --------------------------------------------------------------------------- shared pieces
def _add_common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a .npz or .pt file with arrays X and y (optional X_test, y_test; or X_train, y_train, "
                        "X_test, y_test), or an image folder (root/[train|test]/<class>/*.png); uint8 images are "
                        "scaled and standardized per channel; default: the bundled digits")
    p.add_argument("--out", required=True, metavar="PATH", help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input of the run)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(args):
    import torch

    from .data import DataFileError, load, load_digits

    torch.manual_seed(args.seed)
    if args.data is None:
        try:
            return load_digits(seed=args.seed)
        except ImportError as exc:
            raise UsageError(f"{exc} (or pass your own --data)") from exc
    try:  # a .npz / .pt file or an image folder (uint8 pixels standardized, the statistics recorded)
        return load(args.data, test_fraction=0.25, seed=args.seed)
    except (DataFileError, ImportError) as exc:
        raise UsageError(str(exc)) from exc


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _check_out(args, suffixes: tuple[str, ...], what: str) -> None:
    """Before any work: ``--out`` is a file of one of ``suffixes`` in an existing folder, is no
    input of the run (``--data``, ``--checkpoint``), and replaces an existing file only with
    ``--overwrite``."""
    path = args.out
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a directory; name a file in it")
    if not path.endswith(suffixes):
        raise UsageError(f"--out {path}: write {what} to a {', '.join(suffixes[:-1])} or {suffixes[-1]} file"
                         if len(suffixes) > 1 else f"--out {path}: write {what} to a {suffixes[0]} file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: the folder {folder} does not exist")
    inputs = {"--data": args.data, "--checkpoint": getattr(args, "checkpoint", None)}
    for flag, given in inputs.items():
        if given and _same_file(path, given):
            raise UsageError(f"--out {path} is the {flag} of this run; writing it would destroy it")
    if args.data and getattr(args, "checkpoint", None) and _same_file(args.data, args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} is the --data of this run; checkpointing would destroy it")
    if os.path.exists(path) and not args.overwrite:
        raise UsageError(f"--out {path} exists: pass --overwrite to replace it, or choose another name")


def _check_resume(args) -> None:
    """--resume needs a --checkpoint, and an existing checkpoint needs --resume (no silent overwrite)."""
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    if args.checkpoint and os.path.isdir(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} is a directory; name a file")
    if args.checkpoint and os.path.exists(args.checkpoint) and not args.resume:
        raise UsageError(f"--checkpoint {args.checkpoint} exists: pass --resume to continue it, or remove it")


def _images(X, what: str):
    if X.dim() != 4:
        raise UsageError(f"{what} needs images [N, C, H, W]; the data has shape {tuple(X.shape)}")
    return X


# --------------------------------------------------------------------------- distill
def _method_options(args) -> dict:
    """``--set KEY=VALUE`` pairs as keyword options (values read as Python literals)."""
    import ast

    options = {}
    for item in args.options:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr_img=0.01")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: a string option such as metric=cos
        options[key.strip()] = value
    return options


def cmd_distill(args) -> None:
    from .distill import distill, evaluate
    from .distill.api import check_options

    _check_out(args, (".pt", ".pth"), "the synthetic set")
    convnet = {"width": args.width, **({"depth": args.depth} if args.depth is not None else {})}
    options = {"model_options": convnet if args.model in ("convnet", "convnetbn") else {},
               "init": args.init}
    if args.low_memory:
        if args.method != "mtt":
            raise UsageError("--low-memory applies to --method mtt")
        options["low_memory"] = True
    options.update(_method_options(args))
    try:  # every option is checked before the data is read
        check_options(args.method, options)
    except ValueError as exc:
        raise UsageError(f"--set: {exc}") from exc
    _check_resume(args)
    data = _load(args)
    X = _images(data.X_train, "distill").float()  # the networks are float32, whatever the file holds
    try:
        syn = distill(X, data.y_train, args.method, args.ipc, model=args.model, iterations=args.iterations,
                      seed=args.seed, checkpoint=args.checkpoint, progress=not args.no_progress, **options)
    except ValueError as exc:  # ipc larger than a class, image size the model cannot take, ...
        raise UsageError(str(exc)) from exc
    if getattr(data, "normalization", None) is not None:  # so the set can be shown in pixel space
        syn.info["normalization"] = data.normalization.as_dict()
    syn.save(args.out)
    print(f"wrote {len(syn.images)} synthetic images ({args.ipc} per class, {args.method}) to {args.out}")
    if args.evaluate:
        mean, std = evaluate(syn, data.X_test.float(), data.y_test, model=args.model,
                             n_models=args.evaluate, epochs=args.eval_epochs, seed=args.seed,
                             model_options=options["model_options"])
        print(f"test accuracy of {args.evaluate} fresh {args.model}s trained on it: {100 * mean:.1f} ± {100 * std:.1f}%")


# --------------------------------------------------------------------------- value
def _save_scores(path: str, scores, header: str) -> None:
    """Scores to ``path``: a .csv with an index column, else .npy (checked by ``_check_out``)."""
    import numpy as np

    values = scores.detach().cpu().double().numpy()
    if path.endswith(".csv"):
        np.savetxt(path, np.column_stack([np.arange(len(values)), values]), delimiter=",",
                   header=f"index,{header}", comments="", fmt=["%d", "%.10g"])
    else:
        np.save(path, values)


def cmd_value(args) -> None:
    import torch

    from .valuation import InfluenceFunction, KNNUtility, ModelUtility, knn_shapley, tmc_shapley

    _check_out(args, (".npy", ".csv"), "scores")
    if (args.checkpoint or args.resume) and args.method != "tmc":
        raise UsageError(f"--checkpoint and --resume apply to --method tmc; {args.method} runs in one go "
                         "and does not checkpoint")
    _check_resume(args)
    data = _load(args)
    Xtr, Xte = data.X_train.flatten(1), data.X_test.flatten(1)
    try:
        if args.method == "knn":
            scores = knn_shapley(Xtr, data.y_train, Xte, data.y_test, k=args.k)
        elif args.method == "tmc":
            utility = KNNUtility(Xtr, data.y_train, Xte, data.y_test, k=args.k) if args.utility == "knn" else \
                ModelUtility(Xtr, data.y_train, Xte, data.y_test)
            scores = tmc_shapley(utility, len(Xtr), max_permutations=args.permutations, seed=args.seed,
                                 checkpoint=args.checkpoint, progress=not args.no_progress).values
        else:  # influence of each training point on the test loss of a logistic-regression model
            from .train import train_model

            num_classes = int(data.y_train.max()) + 1
            model = torch.nn.Linear(Xtr.shape[1], num_classes).to(Xtr.dtype)  # float64 data: a float64 model
            train_model(model, Xtr, data.y_train, epochs=args.epochs, lr=0.1, weight_decay=1e-3, seed=args.seed)
            kron = args.hessian in ("kfac", "ekfac")  # Kronecker-factored: its own damping heuristic
            influence = InfluenceFunction(model.eval(), damping=None if kron else 1e-3,
                                          hessian=args.hessian).fit(Xtr, data.y_train)
            # value = how much a point lowers the test loss (-I_up,loss summed over the test set);
            # self-influence is large for points the model cannot explain (e.g. mislabelled)
            scores = influence.self_influence() if args.influence == "self" else \
                -influence.scores(Xte, data.y_test).sum(1)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.method == "influence" and args.influence == "self":
        _save_scores(args.out, scores, "self_influence")
        top = torch.argsort(scores, descending=True)[:5].tolist()
        print(f"wrote {len(scores)} self-influence scores to {args.out}; most suspicious training points: {top}")
        return
    _save_scores(args.out, scores, f"{args.method}_value")
    top = torch.argsort(scores)[:5].tolist()
    print(f"wrote {len(scores)} {args.method} values to {args.out}; lowest-valued training points: {top}")


# --------------------------------------------------------------------------- prune
def cmd_prune(args) -> None:
    import numpy as np

    from .pruning import el2n_scores, prototype_scores, recommend_keep, select, self_supervised_embeddings

    _check_out(args, (".npy", ".csv", ".txt"), "indices")
    if not 0.0 < args.keep <= 1.0:
        raise UsageError(f"--keep must be a fraction in (0, 1], got {args.keep}")
    data = _load(args)
    X, y = data.X_train.float(), data.y_train  # scored by float32 networks
    num_classes = int(y.max()) + 1
    try:
        if args.score == "prototypes":
            emb = self_supervised_embeddings(_images(X, "--score prototypes"), epochs=args.epochs, seed=args.seed,
                                             progress=not args.no_progress) if X.dim() == 4 else X
            scores = prototype_scores(emb, n_clusters=args.clusters or num_classes, seed=args.seed)
        else:
            from .models import get_model

            if X.dim() == 4:
                model_fn = lambda: get_model("convnet", X.shape[1], num_classes, tuple(X.shape[-2:]), width=32, depth=2)  # noqa: E731
            else:
                model_fn = lambda: get_model("mlp", X.shape[1], num_classes, 1, hidden=(128,))  # noqa: E731
            scores = el2n_scores(model_fn, X, y, epochs=min(args.epochs, 10), n_runs=3, seed=args.seed)
        keep = args.policy
        if keep == "auto":
            # the theory's boundary in the scores' own representation: embedding width or input size
            dim = emb.shape[1] if args.score == "prototypes" else X[0].numel()
            keep = recommend_keep(len(y), args.keep, num_classes, dim=dim).keep
        kept = select(scores, args.keep, keep=keep, labels=y, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    idx = kept.cpu().numpy().astype(np.int64)
    if args.out.endswith(".npy"):
        np.save(args.out, idx)
    else:
        np.savetxt(args.out, idx, fmt="%d")
    print(f"kept {len(idx)} of {len(y)} training points ({keep} examples by {args.score}); indices in {args.out}")


# --------------------------------------------------------------------------- bench, demo
BENCHES = ("per_sample", "kernels", "distill", "pruning", "valuation")
DATASET_BENCHES = ("valuation_scale",)  # need --dataset PATH (real MNIST): not part of "all"


def _bench_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(here, "bench")
    if not os.path.isfile(os.path.join(folder, "bench_per_sample.py")):
        raise UsageError("the benchmarks live in the source repository's bench/ folder, which this install lacks: "
                         "run fastdd bench from a git checkout (pip install -e .)")
    return folder


def cmd_bench(args, extra: list[str]) -> int:
    folder = _bench_dir()
    status = 0
    for name in BENCHES if args.which == "all" else [args.which]:
        script = os.path.join(folder, f"bench_{name}.py")
        print(f"$ python {os.path.relpath(script)} {' '.join(extra)}", flush=True)
        status = subprocess.call([sys.executable, script, *extra]) or status
    return status


# --------------------------------------------------------------------------- parser
class _DefaultsAndRawEpilog(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in --help, and an epilog printed as written (one method per line)."""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = _Parser(prog="fastdd", description="Data valuation, pruning and dataset distillation.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Each subcommand has its own --help.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{distill,value,prune,bench,demo}")

    from .distill.api import METHODS, method_options
    from .models import ZOO

    listing = "\n".join(f"  {m}: {', '.join(method_options(m))}" for m in METHODS)
    p = sub.add_parser("distill", help="shrink the data to a few synthetic images per class",
                       formatter_class=_DefaultsAndRawEpilog,
                       epilog=f"options each method takes with --set (see fastdd.distill for their meaning):\n{listing}")
    _add_common(p, "file for the synthetic set (torch; load with fastdd.distill.SyntheticSet.load)")
    p.add_argument("--method", choices=["dd", "dc", "dsa", "dm", "mtt"], default="dm", help="distillation method")
    p.add_argument("--ipc", type=_count(1), default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=_count(0), default=None, help="outer iterations (default: the method's, 200)")
    p.add_argument("--model", default="convnet", choices=list(ZOO), help="network (the reference code's zoo)")
    p.add_argument("--init", default="real", choices=["real", "noise"], help="start from real images or noise")
    p.add_argument("--width", type=_count(1), default=128, help="ConvNet width (the papers': 128)")
    p.add_argument("--depth", type=_count(1), default=None,
                   help="ConvNet depth (default by image size: 3 at 28x28 and 32x32, the papers' ConvNet-3; 2 on 8x8)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="save progress here every 20 iterations")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    p.add_argument("--low-memory", action="store_true",
                   help="mtt: recompute student steps in the backward (memory of one step, same result)")
    p.add_argument("--evaluate", type=_count(0), default=0, metavar="N",
                   help="then train N fresh models on the synthetic set and report test accuracy (0: skip)")
    p.add_argument("--eval-epochs", type=_count(1), default=None, metavar="E",
                   help="epochs of each --evaluate model (default: the papers' rule, 1000 with the method's "
                        "augmentation, 300 without)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="a method option, repeatable (e.g. --set lr_img=0.01 --set inner_steps=20); values are "
                        "Python literals, else strings; each method's options are listed below")

    p = sub.add_parser("value", help="how much each training point is worth", formatter_class=fmt)
    _add_common(p, "file for the values, one per training point (.npy or .csv)")
    p.add_argument("--method", choices=["knn", "tmc", "influence"], default="knn",
                   help="knn: exact KNN-Shapley; tmc: Truncated Monte Carlo Shapley; influence: influence functions")
    p.add_argument("--k", type=_count(1), default=5, help="neighbours of the KNN utility (knn, tmc)")
    p.add_argument("--utility", choices=["knn", "logreg"], default="knn", help="utility for tmc")
    p.add_argument("--permutations", type=_count(1), default=100, help="most permutations for tmc")
    p.add_argument("--influence", choices=["test", "self"], default="test",
                   help="influence: summed over the test set, or self-influence")
    p.add_argument("--epochs", type=_count(1), default=100, help="training epochs of the influence model")
    p.add_argument("--hessian", choices=["exact", "ekfac", "kfac"], default="exact",
                   help="influence: the exact Hessian (block CG), or EK-FAC / K-FAC curvature (large models)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="tmc: save progress here")
    p.add_argument("--resume", action="store_true", help="tmc: continue the run saved in --checkpoint")

    p = sub.add_parser("prune", help="choose which training points to keep", formatter_class=fmt)
    _add_common(p, "file for the kept indices (.npy, .csv or .txt)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of the training set to keep")
    p.add_argument("--score", choices=["prototypes", "el2n"], default="prototypes",
                   help="prototypes: self-supervised k-means distance (no labels); el2n: error norm of trained models")
    p.add_argument("--policy", choices=["auto", "easy", "hard", "random", "ccs", "moderate"], default="auto",
                   help="keep easy or hard examples (auto follows Sorscher et al.: hard when data is abundant), "
                        "ccs (coverage-centric: holds at high pruning rates), moderate (scores nearest the median) "
                        "or random")
    p.add_argument("--clusters", type=_count(0), default=0, help="k-means clusters (0: the number of classes)")
    p.add_argument("--epochs", type=_count(1), default=30, help="training epochs of the embedding / scoring models")

    p = sub.add_parser("bench", help="run a benchmark from the source tree's bench/ (extra options pass through)",
                       formatter_class=fmt)
    p.add_argument("which", choices=[*BENCHES, *DATASET_BENCHES, "all"],
                   help="which benchmark (valuation_scale takes --dataset PATH to MNIST's .npz)")

    sub.add_parser("demo", help="the whole demo on digits; writes results/README.md (options: fastdd demo --help)",
                   add_help=False)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from . import demo

        demo.main(argv[1:])
        return 0
    parser = build_parser()
    extra: list[str] = []
    if argv[:1] == ["bench"]:
        args, extra = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return cmd_bench(args, extra)
        {"distill": cmd_distill, "value": cmd_value, "prune": cmd_prune}[args.command](args)
    except UsageError as exc:
        print(f"fastdd {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastdd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
