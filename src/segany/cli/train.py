"""``segany train CONFIG [--override section.key=value ...] [--resume]``: the SAM training recipe.

CONFIG is a YAML file or the name of a config shipped with segany (``segany_tiny_cpu_finetune``), also
given as ``--config CONFIG``.

Launch on several GPUs with ``torchrun --nproc-per-node N -m segany.cli.train CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segany.atomic import atomic_write_text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train or fine-tune a model with the SAM interactive recipe",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    from segany.train.config import bundled_configs

    shipped = ", ".join(bundled_configs())
    p.add_argument("config", nargs="?", help=f"YAML config file, or the name of one shipped with segany ({shipped}); "
                                             "defaults apply when omitted")
    p.add_argument("--config", dest="config_option", default=None, metavar="CONFIG",
                   help="the same as the CONFIG argument (a YAML file or a shipped config's name)")
    p.add_argument("--override", "-o", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set one config value, e.g. optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its last.pt")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget (sets run.max_minutes)")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="write fp16 inference weights here at the end (default OUT_DIR/model_fp16.pt)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")


def run(args: argparse.Namespace) -> int:
    from segany.cli._checks import check_out_dir, check_out_file
    from segany.errors import InputError
    from segany.train.config import load_config

    if args.config_option is not None:
        if args.config is not None and args.config != args.config_option:
            raise InputError(f"two configs given ({args.config!r} and --config {args.config_option!r}); pass one")
        args.config = args.config_option
    overrides = list(args.override)
    if args.max_minutes is not None:
        overrides.append(f"run.max_minutes={args.max_minutes}")
    # Everything the user typed (config, output paths, pack and its datasets, a resume's changes) is checked
    # before the model is built or a folder is made.
    cfg = load_config(args.config, overrides)
    check_out_dir(cfg.run.out_dir, "run.out_dir")
    if args.export:
        check_out_file(args.export, "--export")
    from segany.train.trainer import RunLock, resolve_device

    resolve_device(cfg.run.device)  # run.device=cuda on a machine without one
    # Rank 0 (the one that writes) holds the folder until its export: a folder another run is writing is refused
    # now, before the resume checks read it and before the model is built. Without a lock file yet nobody holds
    # it, and none is made before the checks pass: fit() takes it then (making the folder and the file).
    lock = RunLock(cfg.run.out_dir) if _launch_rank() == 0 else None
    if lock is not None:
        lock.acquire(create=False)
    try:
        return _train(args, cfg, lock)
    finally:
        if lock is not None:
            lock.release()


def _launch_rank() -> int:
    """This process's rank under torchrun (0 otherwise), known before the process group is set up."""
    import os

    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _train(args: argparse.Namespace, cfg: Any, lock: Any) -> int:
    from segany.train.config import config_warnings
    from segany.train.trainer import Trainer

    last = _check_resume(cfg, args.resume)
    records, notes = _check_data(cfg)

    trainer = Trainer(cfg, train_records=records, run_lock=lock)
    for note in notes:
        _say(trainer, note)
    if last is not None:
        trainer.load(last)
        _say(trainer, f"resumed from {last} at step {trainer.step}")
        for note in trainer.resume_notes:
            _say(trainer, note)
    else:
        _say(trainer, f"initial weights: {_init_source(cfg, trainer)}")
    for note in config_warnings(cfg):  # after every check passed: a refusal stays one line
        _say(trainer, note)
    if trainer.rank == 0:  # only rank 0 validates
        val_note = trainer.validation_note()
        if val_note:
            _say(trainer, val_note)
    n_params = sum(p.numel() for p in trainer.sam.parameters())
    _say(trainer, f"model {cfg.model.name} ({n_params / 1e6:.2f} M parameters) on {trainer.device}, "
                  f"world size {trainer.world}, batch {cfg.run.batch_size}/process, "
                  f"{cfg.recipe.num_rounds} rounds/mask, out {cfg.run.out_dir}")

    def on_log(entry: dict[str, Any]) -> None:
        if args.quiet:
            return
        mem = f" mem {entry['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in entry else ""
        if "val_score" in entry:
            print(f"step {entry['step']:6d}  val box mIoU {entry['val_box_miou']:.3f}  1-click mIoU "
                  f"{entry['val_miou_1']:.3f}  score {entry['val_score']:.4f}"
                  f"{'  (best: saved best.pt)' if entry.get('best') else ''}"
                  f"{'  (starting weights: a step must beat this to write best.pt)' if entry.get('base') else ''}",
                  flush=True)
            return
        print(f"step {entry['step']:6d}  {entry['time_s']:7.1f}s  loss {entry['loss']:.4f}  "
              f"IoU first {entry.get('iou_first', 0):.3f} last {entry.get('iou_last', 0):.3f}  "
              f"lr {entry['lr']:.2e}  {entry['images_per_s']:.1f} img/s{mem}", flush=True)

    try:
        summary = trainer.fit(on_log=on_log)
    except KeyboardInterrupt:
        if trainer.rank == 0:
            saved = getattr(trainer, "interrupt_checkpoint", None)
            where = f"saved {saved} at step {trainer.step}" if saved else "no checkpoint saved"
            print(f"segany: interrupted; {where}; rerun with --resume to continue", file=sys.stderr, flush=True)
        return 130
    if trainer.rank == 0:
        from segany.train.trainer import json_safe

        export = Path(args.export) if args.export else Path(cfg.run.out_dir) / "model_fp16.pt"
        summary = json_safe(summary)  # JSON has no NaN: a bare NaN made summary.json unreadable
        trainer.export(export, half=True, meta={"config": cfg.to_dict(), "summary": summary},
                       option="--export PATH" if args.export else "-o run.out_dir")
        summary["export"] = str(export)
        text = json.dumps(summary, indent=1, allow_nan=False)
        summary_path = Path(cfg.run.out_dir) / "summary.json"
        with trainer.writing(summary_path, len(text)):
            atomic_write_text(summary_path, text)
        print(text)
        if summary.get("no_improvement"):
            _say(trainer, summary["no_improvement"])
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _check_resume(cfg: Any, resume: bool) -> Path | None:
    """The state to resume from (None: a fresh run); refuses to overwrite a run or to change one's maths."""
    from segany.errors import InputError
    from segany.train.resume import check_resume_config, saved_config

    last = Path(cfg.run.out_dir) / "last.pt"
    if not last.exists():
        if resume:  # starting over here would overwrite the folder's config.json and log.jsonl
            raise InputError(f"no last.pt in {cfg.run.out_dir}: nothing to resume; drop --resume to start a new run")
        return None
    if not resume:  # starting over would overwrite that run's checkpoint and log
        raise InputError(f"run.out_dir {cfg.run.out_dir!r} already holds a training run ({last.name}); pass "
                         "--resume to continue it, or start a new one elsewhere with -o run.out_dir=FOLDER")
    check_resume_config(saved_config(last), cfg, cfg.run.out_dir)
    return last


def _check_data(cfg: Any) -> tuple[list[Any], list[str]]:
    """The training records (the pack and its dataset names checked), and notes for the user."""
    from segany.train.data import effective_repeat, train_records, val_records

    records = train_records(cfg.data)
    _, ignored = effective_repeat(records, cfg.data.repeat)
    notes = []
    if ignored:
        have = ", ".join(sorted({r.dataset for r in records}))
        notes.append(f"note: data.repeat entries for {', '.join(ignored)} ignored: not among the training "
                     f"datasets ({have})")
    if cfg.run.val_every:
        val_records(cfg.data)  # a pack without held-out images fails now, not at the first validation
    return records, notes


def _init_source(cfg: Any, trainer: Any) -> str:
    from segany.train.config import BUNDLED
    from segany.train.init_weights import describe_init

    # The digest the run records (trainer.provenance), so the file is hashed once, not again for this line.
    sha = None if trainer.init_checkpoint is None else trainer.provenance()["init_sha256"]
    return describe_init(trainer.init_checkpoint, cfg.model.checkpoint == BUNDLED, sha)


def _say(trainer: Any, msg: str) -> None:
    if trainer.rank == 0:
        print(f"[segany] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m segany.cli.train``, the torchrun command docs/cli.md gives): ``segany train``
    itself, so a bad option is one ``segany: error:`` line per process, not a traceback each."""
    from segany.cli.main import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
