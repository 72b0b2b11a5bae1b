"""The training command: ``e2former-train`` (installed) and ``python train.py`` (its wrapper in a checkout).

e2former-train                                    # the demo: small model on the shipped demo data
e2former-train --config paper_spice --set optim.lr=2e-4 --set data.train=PATH   # a preset by name
e2former-train --config my_run.yaml               # a YAML file (may start from `preset: NAME`)
e2former-train --workdir runs/demo --resume       # continue an interrupted run exactly
e2former-train --workdir runs/demo --resume --set run.steps=20000   # extend a finished run
e2former-train --config paper_omol25_stage2 --init-from runs/stage1 --no-strict
e2former-train --devices 4 --global-atom-budget 8192   # data-parallel: 4 local GPUs, 2,048 atoms each
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from e2former_jax.cli_errors import UsageError, add_debug_flag, run_command
from e2former_jax.training.config import TRAIN_PRESETS


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="e2former-train",
    description="Train E2Former-V2. Without arguments: the `small` model on the shipped demo "
    "data (configs/demo.yaml), ending with the held-out error table.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--config",
    metavar="NAME|PATH",
    help=f"a preset name ({', '.join(TRAIN_PRESETS)}) or a YAML config file; default: the demo preset",
  )
  p.add_argument(
    "--preset", help="start from a named preset instead (demo, paper_spice, paper_omol25_stage1, paper_omol25_stage2)"
  )
  p.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="SECTION.KEY=VALUE",
    help="override a config entry (value parsed as YAML); repeatable",
  )
  p.add_argument("--workdir", help="run directory (default: runs/<config name>-<date-time>)")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in --workdir from its newest checkpoint (parameters, optimizer state, step, data "
    "order, RNG) with its saved config; --set may change run length, evaluation and checkpoint cadence, logging",
  )
  p.add_argument(
    "--init-from",
    metavar="CKPT",
    help="start from the weights of a checkpoint (run or step "
    "directory); a new run: optimizer, step and data order start afresh",
  )
  strict = p.add_mutually_exclusive_group()
  strict.add_argument(
    "--strict",
    dest="strict",
    action="store_true",
    default=None,
    help="--init-from: every parameter must match (default unless the config says otherwise)",
  )
  strict.add_argument(
    "--no-strict",
    dest="strict",
    action="store_false",
    help="--init-from: load the parameters whose name and shape match, keep the others",
  )
  p.add_argument(
    "--devices",
    type=int,
    metavar="N",
    help="local devices to train on, data-parallel (default: all local devices; under jax.distributed, per host)",
  )
  p.add_argument(
    "--global-atom-budget",
    type=int,
    metavar="ATOMS",
    help="atoms per global batch (all devices of all hosts); sets data.atom_budget (per device) to ATOMS / devices",
  )
  p.add_argument(
    "--float64", action="store_true", help="train in float64 (sets model.dtype=float64 and enables 64-bit JAX)"
  )
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  add_debug_flag(p)
  return p


def jax_initialized_distributed() -> bool:
  import jax

  return jax.distributed.is_initialized()


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  return run_command("e2former-train", lambda: _train(args), debug=args.debug)


def _train(args: argparse.Namespace) -> int:
  t0 = time.time()
  import yaml

  from e2former_jax.training.config import (
    TrainConfig,
    apply_overrides,
    check_resumable,
    get_train_config,
    load_config,
    resumed_config,
  )

  overrides = list(args.overrides)
  if args.float64:
    import jax

    jax.config.update("jax_enable_x64", True)
    overrides.append("model.dtype=float64")
  if args.global_atom_budget is not None and not args.print_config:
    import jax

    from e2former_jax.training.distributed import initialize_distributed

    initialize_distributed()
    per_host = jax.local_device_count() if args.devices is None else args.devices
    total = per_host * jax.process_count()
    if args.global_atom_budget % total:
      raise UsageError(f"--global-atom-budget {args.global_atom_budget} does not split evenly over {total} devices")
    overrides.append(f"data.atom_budget={args.global_atom_budget // total}")
  if args.init_from:
    overrides.append(f"init.checkpoint={args.init_from}")
  if args.strict is not None:
    overrides.append(f"init.strict={'true' if args.strict else 'false'}")

  if args.config and args.preset:
    raise UsageError("give --config or --preset, not both")
  if args.resume:
    if not args.workdir:
      raise UsageError("--resume needs --workdir (the run to continue)")
    saved_path = Path(args.workdir) / "config.yaml"
    if not saved_path.exists():
      raise UsageError(f"--resume: {args.workdir} holds no run to continue (no config.yaml)")
    saved = load_config(saved_path)
    if args.config or args.preset:  # must be the run's own config (up to what a resume may change)
      check_resumable(saved, load_config(args.config or args.preset, overrides))
    cfg = resumed_config(saved, overrides)
  elif args.preset:
    cfg = TrainConfig.from_dict(apply_overrides(get_train_config(args.preset).to_dict(), overrides))
  else:
    cfg = load_config(args.config, overrides)
  if args.print_config:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0
  name = Path(args.config).stem if args.config else (args.preset or "demo")
  workdir = (
    Path(args.workdir)
    if args.workdir
    else Path("runs") / (f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
  )

  from e2former_jax.evaluation import format_table
  from e2former_jax.training.distributed import initialize_distributed
  from e2former_jax.training.loop import train

  if not jax_initialized_distributed():
    initialize_distributed()  # multi-host: before any device is touched (env vars: training/distributed.py)
  result = train(cfg, workdir, resume=args.resume, devices=args.devices)
  if result.test_table is not None:
    print(
      f"\nHeld-out errors ({cfg.data.test}; checkpoint step {result.best['step']}, "
      f"{result.workdir / 'test_errors.json'}):"
    )
    print(format_table(result.test_table))
  print(
    f"\nrun directory: {result.workdir}; {result.step} steps, {result.skipped} skipped; "
    f"train() {result.wall_s:.0f} s, process {time.time() - t0:.0f} s wall "
    f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})"
  )
  return 0


def console() -> int:
  """The installed ``e2former-train`` (and ``python train.py``): ``main`` in a process with huge pages.

  glibc's malloc hands XLA's large per-step buffers back to the kernel and faults them in again on every step
  (about 70,000 page faults and a quarter of the CPU time of a demo step on 2 cores). Backed by transparent
  huge pages they fault a hundred times less (measured: 73,000 -> 600 faults, 0.45 -> 0.36 s per step). glibc
  reads the tunable at process start only, so the process restarts once, before JAX is imported. Set
  GLIBC_TUNABLES yourself to choose otherwise.
  """
  if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    os.execv(sys.executable, [sys.executable, *sys.argv])
  return main()


if __name__ == "__main__":
  sys.exit(console())
