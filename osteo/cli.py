"""The ``osteo`` command.

    osteo synth OUT_DIR [--n-per-class 1500 --size 256 --seed 0]   write the synthetic DICOM set
    osteo train MANIFEST [--model twin --epochs 60 ...] --out DIR     train one config
    torchrun --nproc_per_node N -m osteo train MANIFEST --out DIR     one run shared by N processes/GPUs
    osteo reproduce [--profile auto|smoke|laptop|paper --seeds 0]     run every notebook (papermill)
    osteo grid [--profile P --tables table2 ... --seeds 0 --worker I/N --batch-runs N]  train the tables' runs, no notebooks
    osteo report --profile P                                          rebuild results/P/REPORT.md
    osteo predict CHECKPOINT PATH... [--out predictions.csv --gradcam DIR]
    osteo bench [--image-size 224 --batch-size 128]                   training throughput table
    osteo weights status | download [NETWORK...] | import FILE...       ImageNet weights (offline machines)

A mistake in the command or its input (a missing or damaged file, a foreign checkpoint, a bad
option value) ends with one line ``osteo: error: <file>: <problem>`` on stderr and exit code 2;
a Python traceback means a bug in osteo. ``--debug`` (anywhere on the line) shows the traceback
of any error.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from . import bench, distributed
from . import weights as w
from .data import load_data
from .dicom import DicomError
from .experiments import PROFILES, TABLES, Experiments, cpu_warning, describe, project_root, resolve_profile
from .manifest import ManifestError
from .models import MODELS, model_spec
from .predict import PredictError, predict_files
from .report import duration, write_report
from .synthetic import SyntheticError, synthesize
from .training import CheckpointError, DeviceError, TrainConfig, resolve_device, train
from .training import _MAX_IMAGE_SIZE as MAX_IMAGE_SIZE
from .weights import WeightsError


class UserError(Exception):
    """A mistake in the command line or its input: shown as one ``osteo: error:`` line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong option is a :class:`UserError` (one line, exit code 2), not usage text."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _user_error_types() -> tuple:
    """The exceptions that report a user's mistake (each names its file), not a bug in osteo."""
    return (UserError, DicomError, ManifestError, CheckpointError, DeviceError, PredictError, WeightsError, OSError,
            SyntheticError)


def _message(e: BaseException) -> str:
    """The text after ``osteo: error:`` for a user error."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{os.fsdecode(e.filename)}: {e.strerror[:1].lower()}{e.strerror[1:]}"
    else:
        text = str(e).strip() or type(e).__name__
    # several problems (a manifest's, several unreadable slices) as one line, joined by "; "
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    text = lines[0].rstrip(":") + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else text
    # the bytes of a non-UTF-8 file name as \xNN, so the message prints on any terminal
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_profile(name: str) -> None:
    if name not in (*PROFILES, "auto"):
        raise UserError(f"--profile {name!r}: unknown profile; choose one of {', '.join(PROFILES)} or auto")


NOTEBOOK_OF = {"table2": "03", "table3": "04", "table4": "05", "table5": "06", "fig3": "07", "fig4": "08"}


def _cmd_synth(a) -> int:
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{a.out_dir}: exists and is not a folder")
    if a.size > MAX_IMAGE_SIZE:  # before a size x size slice is allocated
        raise UserError(f"--size {a.size}: too large (at most {MAX_IMAGE_SIZE} pixels)")
    try:
        df = synthesize(a.out_dir, n_per_class=a.n_per_class, size=a.size, seed=a.seed,
                        slices_per_patient=a.slices_per_patient, overwrite=a.overwrite,
                        n_test_per_class=a.n_test_per_class)
    except ValueError as e:
        if str(e).startswith("synthesize:"):  # the generator's checks of its arguments
            raise UserError(str(e)) from None
        raise
    print(f"wrote {len(df)} slices of {df['patient_id'].nunique()} patients to {a.out_dir}/manifest.csv")
    return 0


def _cmd_train(a) -> int:
    if a.model not in MODELS:
        raise UserError(f"--model {a.model!r}: unknown model; choose one of {', '.join(MODELS)}")
    for name in ("lr", "lam", "alpha"):
        v = getattr(a, name)
        if not v == v or v in (float("inf"), float("-inf")) or (name == "lr" and v <= 0):
            raise UserError(f"--{name} {v}: must be a finite number{' > 0' if name == 'lr' else ''}")
    if a.image_size < 16:
        raise UserError(f"--image-size {a.image_size}: too small (at least 16 pixels)")
    if a.image_size > MAX_IMAGE_SIZE:  # before a slices x size x size array is allocated
        raise UserError(f"--image-size {a.image_size}: too large (at most {MAX_IMAGE_SIZE} pixels)")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise UserError(f"{a.out}: --out exists and is not a folder")
    try:
        cfg = TrainConfig(
            model=a.model, inputs=tuple(a.inputs) if a.inputs else model_spec(a.model).default_inputs,
            lam=a.lam, alpha=a.alpha, learn_alpha=not a.fixed_alpha, epochs=a.epochs, batch_size=a.batch_size,
            lr=a.lr, image_size=a.image_size, pretrained={"true": True, "false": False}.get(a.pretrained, a.pretrained),
            seed=a.seed, device=a.device,
        )
    except (ValueError, NotImplementedError) as e:
        raise UserError(str(e).replace("TrainConfig.", "--").replace("TrainConfig: ", "")) from None
    resolve_device(cfg.device)
    world = distributed.current_world()  # under torchrun: the processes train this run together
    say = print if world is None or world.main else (lambda *args, **kw: None)
    try:
        data = load_data(a.manifest, image_size=cfg.image_size, seed=a.seed)
    except ManifestError as e:  # a problem of the split (too few patients, ...) names the manifest
        if str(e).startswith(str(a.manifest)):
            raise
        raise ManifestError(f"{a.manifest}: {str(e).removeprefix('split_patients: ')}") from None
    say(data.describe())
    try:
        res = train(cfg, data, out_dir=a.out)
    except ValueError as e:
        # the network's own checks of its options (image size, ...), and an empty or 1-slice split
        if str(e).startswith("osteo/models.py: ") or "training split" in str(e):
            raise UserError(f"{a.manifest}: {str(e).removeprefix('osteo/models.py: ')}") from None
        raise
    lo, hi = res.accuracy_ci95
    head = res.test[res.main_head]
    say(f"test accuracy {res.accuracy:.4f} (95 % CI {lo:.4f}-{hi:.4f}, {head.get('interval', 'Wilson')}) on "
          f"{head['n']} slices of {head.get('n_patients', '?')} patients; "
          f"ImageNet weights: {'yes' if res.pretrained_used else 'no'}; result in {a.out}/result.json")
    return 0


def reproduce(profile: str = "auto", notebooks=None, tables=None, seeds=None) -> int:
    """Execute the notebooks in order with papermill into ``results/<profile>/notebooks/``.

    ``seeds`` overrides the profile's seeds (the notebooks' ``seeds`` parameter), e.g. ``[0]``.
    """
    import papermill as pm  # optional here: papermill (and its kernel machinery) loads only to run notebooks

    _check_profile(profile)
    prof = resolve_profile(profile)
    warning = cpu_warning(prof)
    if warning:
        print(warning, file=sys.stderr)
    root = project_root()
    nb_dir = root / "notebooks"
    all_nbs = sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if not all_nbs:
        raise UserError(f"{nb_dir}: no notebooks found")
    wanted = set(notebooks or [])
    for nb in wanted:
        if not any(p.name[:2] == nb or p.stem == nb for p in all_nbs):
            raise UserError(f"--notebooks {nb!r}: no such notebook in {nb_dir} "
                            f"(numbers {', '.join(p.name[:2] for p in all_nbs)})")
    for t in tables or []:
        if t not in NOTEBOOK_OF:
            raise UserError(f"--tables {t!r}: unknown table; choose from {', '.join(NOTEBOOK_OF)}")
        wanted.add(NOTEBOOK_OF[t])
    if wanted:
        wanted.add("09")  # the report always follows
        all_nbs = [p for p in all_nbs if p.name[:2] in wanted or p.stem in wanted]
    out_dir = root / "results" / prof.name / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds_note = f"; seeds {', '.join(map(str, seeds))} (the profile's: {', '.join(map(str, prof.seeds))})" if seeds else ""
    print(f"profile {prof.name}: {prof.note}{seeds_note}; {len(all_nbs)} notebooks -> {out_dir.relative_to(root)}")
    env_before = os.environ.get("OSTEO_PROFILE")
    os.environ["OSTEO_PROFILE"] = prof.name

    def params(nb: Path) -> dict:
        p = {"profile": prof.name, "seeds": list(seeds) if seeds else None}
        if nb.name.startswith("09"):  # the report trains what is missing only in a full batch
            p["train_missing"] = not wanted
        return p

    cwd = Path.cwd()
    os.chdir(root)  # relative paths only in the executed notebooks' metadata
    try:
        for nb in all_nbs:
            out = out_dir.relative_to(root) / nb.name
            t0 = time.perf_counter()
            try:
                # A bar over the notebook's cells, and a silent kernel log: its warning that it talks
                # to papermill over TCP (once per notebook) and, on a busy machine, "KeyboardInterrupt
                # caught" when it is stopped after the last cell are noise. A failing cell still
                # comes back in the notebook and raises PapermillExecutionError below.
                pm.execute_notebook(
                    str(nb.relative_to(root)), str(out), parameters=params(nb),
                    cwd=str(nb_dir.relative_to(root)), kernel_name="python3",
                    progress_bar={"desc": nb.stem, "unit": "cell", "leave": True, "file": sys.stdout},
                    log_output=False, report_mode=False, extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
                )
                print(f"{nb.name}: done in {duration(time.perf_counter() - t0)}", flush=True)
            except pm.PapermillExecutionError as e:
                print(f"error: {nb.name} failed in cell [{e.exec_count}]: {e.ename}: {e.evalue}\n"
                      f"the executed notebook with the traceback is {out}", file=sys.stderr)
                return 1
        report = write_report(root / "results" / prof.name)
        print(f"report: {report.relative_to(root)}")
    finally:
        os.chdir(cwd)
        if env_before is None:
            os.environ.pop("OSTEO_PROFILE", None)
        else:
            os.environ["OSTEO_PROFILE"] = env_before
    return 0


def _cmd_reproduce(a) -> int:
    return reproduce(a.profile, notebooks=a.notebooks, tables=a.tables, seeds=a.seeds)


def _cmd_report(a) -> int:
    _check_profile(a.profile)
    exp = Experiments(a.profile, progress=False)
    print(write_report(exp.out))
    return 0


def _parse_worker(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--worker {text!r}: write I/N, e.g. 2/3") from None
    if not 1 <= i <= n:
        raise UserError(f"--worker {text!r}: need 1 <= I <= N")
    return i - 1, n


def _cmd_grid(a) -> int:
    _check_profile(a.profile)
    if a.worker:
        _parse_worker(a.worker)  # before anything is loaded
    if a.batch_runs < 1:
        raise UserError(f"--batch-runs {a.batch_runs}: need N >= 1 (1 trains each run on its own)")
    exp = Experiments(a.profile, seeds=a.seeds, progress=not a.no_progress)
    warning = cpu_warning(exp.profile)
    if warning and not a.only_cached:
        print(warning, file=sys.stderr)
    names = a.tables or list(TABLES)
    if a.worker:
        i, n = _parse_worker(a.worker)
        exp.grid(names, i, n, batch_runs=a.batch_runs)
        return 0
    if not a.only_cached:
        exp.grid(names, batch_runs=a.batch_runs)
    complete = []
    for name in names:
        missing = exp.missing([name])
        if missing:
            print(f"{name}: not saved, {len(missing)} runs missing: " + "; ".join(describe(c) for c in missing))
            continue
        exp.table(name)
        complete.append(name)
    if complete:  # the paper's claims "A beats B", tested pairwise over patients (and seeds)
        exp.paired_table(complete)
    if "table2" in complete:  # Fig. 3's numbers: the heads of Ours
        exp.fig3_table()
    if complete:
        print(f"saved {', '.join(complete)}; report: {write_report(exp.out)}")
    return 0 if len(complete) == len(names) or a.only_cached else 1


def _cmd_predict(a) -> int:
    return predict_files(a.checkpoint, a.paths, out_csv=a.out, gradcam_dir=a.gradcam, device=a.device,
                         allow_unfinished=a.allow_unfinished)


def _cmd_bench(a) -> int:
    bench.main(a.rest, parser=_Parser(prog="osteo bench", description=bench.__doc__.splitlines()[0]))
    return 0


def _error(message: str) -> None:
    print(f"osteo: error: {message}", file=sys.stderr)


def _cmd_weights(a) -> int:
    if a.action == "status":
        rows = w.status()
        print(f"torch cache: {w.cache_dir()}")
        width = max(len(r["file"]) for r in rows)
        for r in rows:
            print(f"{r['network']:<16} {r['file']:<{width}}  {r['state']:<13} {r['sha256']}".rstrip())
        bad = set()
        for r in rows:
            if r["state"] == "HASH MISMATCH" and r["file"] not in bad:
                bad.add(r["file"])
                wf = w.weights_file(r["network"])
                _error(f"{w.cache_dir() / wf.name}: sha256 {r['sha256']} does not match the published hash "
                       f"{wf.sha256_prefix}... of {wf.name}; delete it, then `osteo weights download {r['network']}` "
                       f"or `osteo weights import FILE`")
        return 1 if bad else 0
    failed = 0
    if a.action == "download":
        nets = a.networks or list(w.NETWORKS)
        unknown = [n for n in nets if n not in w.NETWORKS]
        if unknown:
            _error(f"{unknown[0]}: no ImageNet weights known for this network; known: {', '.join(w.NETWORKS)}")
            return 2
        done = set()
        for net in nets:
            wf = w.weights_file(net)
            if wf.name in done:
                continue
            done.add(wf.name)
            try:
                path = w.download(wf, base_url=a.url, progress=True)
                print(f"{wf.name}: verified (sha256 {w.sha256_file(path)}), in {path.parent}")
            except w.WeightsError as e:
                _error(str(e))
                failed += 1
    else:  # import
        for src in a.files:
            try:
                dest = w.import_file(src)
                print(f"{src}: verified as {dest.name} (sha256 {w.sha256_file(dest)}), copied to {dest.parent}")
            except w.WeightsError as e:
                _error(str(e))
                failed += 1
    return 1 if failed else 0


_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="write the synthetic CT DICOM data set")
    s.add_argument("out_dir")
    s.add_argument("--n-per-class", type=int, default=1500)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--slices-per-patient", type=int, default=5, help="slices per training patient")
    s.add_argument("--n-test-per-class", type=int, default=None,
                   help="test slices per class, one per test patient (default 20 %% of --n-per-class)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_synth)


def _add_train(sub) -> None:
    """``osteo train``: every default is TrainConfig's own."""
    d = _TRAIN_DEFAULTS
    t = sub.add_parser("train", help="train one model on a manifest or class folder")
    t.add_argument("manifest")
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt and result.json")
    t.add_argument("--model", default=d["model"], help=f"one of {', '.join(MODELS)}")
    t.add_argument("--inputs", nargs="+", choices=["s", "t"], help="the views the network reads (default: its own)")
    t.add_argument("--lam", type=float, default=d["lam"])
    t.add_argument("--alpha", type=float, default=d["alpha"])
    t.add_argument("--fixed-alpha", action="store_true")
    t.add_argument("--epochs", type=int, default=d["epochs"])
    t.add_argument("--batch-size", type=int, default=d["batch_size"])
    t.add_argument("--lr", type=float, default=d["lr"])
    t.add_argument("--image-size", type=int, default=d["image_size"])
    t.add_argument("--pretrained", default=str(d["pretrained"]).lower(), choices=["auto", "true", "false"])
    t.add_argument("--seed", type=int, default=d["seed"])
    t.add_argument("--device", default=d["device"])
    t.set_defaults(func=_cmd_train)


def _add_runs(sub) -> None:
    """``osteo reproduce``, ``grid`` and ``report``: the paper's experiments."""
    r = sub.add_parser("reproduce", help="run all notebooks headless into results/<profile>/")
    r.add_argument("--profile", default="auto", help="smoke, laptop, paper or auto (paper with CUDA, else laptop)")
    r.add_argument("--notebooks", nargs="+", help="numbers or names of the notebooks to run (default: all)")
    r.add_argument("--tables", nargs="+", help=f"only what these need: {', '.join(NOTEBOOK_OF)}")
    r.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds (e.g. 0 for a first pass)")
    r.set_defaults(func=_cmd_reproduce)

    g = sub.add_parser("grid", help="train the paper's tables without the notebooks (resumable), save them and REPORT.md")
    g.add_argument("--profile", default="auto")
    g.add_argument("--tables", nargs="+", choices=list(NOTEBOOK_OF)[:4], help="default: all four")
    g.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    g.add_argument("--worker", help="I/N: train only runs I, I+N, I+2N, ... (1-based) of the grid, for N processes "
                                    "side by side sharing results/; saves no tables. Make the data first (one "
                                    "`osteo grid --only-cached` does) so that workers do not all make it")
    g.add_argument("--batch-runs", type=int, default=1, metavar="N",
                   help="train up to N missing runs that share a network, input size and epoch count at once, "
                        "as one batched network (each writes the result its own run would)")
    g.add_argument("--only-cached", action="store_true", help="train nothing: save the tables whose runs are all cached")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs of parallel workers)")
    g.set_defaults(func=_cmd_grid)

    rp = sub.add_parser("report", help="rebuild results/<profile>/REPORT.md from the saved tables")
    rp.add_argument("--profile", default="auto")
    rp.set_defaults(func=_cmd_report)


def _add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="classify DICOM slices with a trained checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("paths", nargs="+", help="DICOM files or folders")
    pr.add_argument("--out", default="predictions.csv")
    pr.add_argument("--gradcam", default=None, help="folder for one Grad-CAM PNG per slice")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--allow-unfinished", action="store_true",
                    help="predict with the checkpoint of a run stopped before its last epoch (with a warning)")
    pr.set_defaults(func=_cmd_predict)


def _add_weights(sub) -> None:
    wp = sub.add_parser("weights", help="ImageNet weights: status, download, import (for offline machines)")
    wsub = wp.add_subparsers(dest="action", required=True)
    wsub.add_parser("status", help="which networks' weights are in the torch cache and match their published hash")
    wd = wsub.add_parser("download", help="download and verify the weights of all (or the named) networks")
    wd.add_argument("networks", nargs="*", metavar="NETWORK",
                    help="resnet18, resnet18_acm, inception_v3, efficientnet_b0, vit_b_16, xception; default: all")
    wd.add_argument("--url", default=None, help="a folder URL holding the same file names (a mirror); "
                                                "default: OSTEO_WEIGHTS_URL, else the publishers'")
    wi = wsub.add_parser("import", help="copy checkpoint files carried to this machine into the torch cache, verified")
    wi.add_argument("files", nargs="+", metavar="FILE")
    wp.set_defaults(func=_cmd_weights)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="osteo", description="osteo-kit: reproduce Choi et al. 2021 (twin ResNet18+ACM).",
                                epilog="--debug (anywhere): show the Python traceback of any error")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_synth(sub)
    _add_train(sub)
    _add_runs(sub)
    _add_predict(sub)
    _add_weights(sub)
    b = sub.add_parser("bench", help="training throughput vs plain ResNet18s (options: osteo bench --help)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    """Run one command; a user's mistake ends as one ``osteo: error:`` line and exit code 2
    (130 for Ctrl-C); with ``--debug`` every error shows its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    try:
        if argv[:1] == ["bench"]:  # argparse's REMAINDER drops options that come first; bench parses its own
            bench.main(argv[1:], parser=_Parser(prog="osteo bench", description=bench.__doc__.splitlines()[0]))
            return 0
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("osteo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not isinstance(e, _user_error_types()):
            raise
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun every process meets the error: one says it
            print(f"osteo: error: {_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
