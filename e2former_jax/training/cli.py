"""The command line of ``python train.py``.

python train.py                                   # the demo: small model on the shipped demo data
python train.py --config configs/paper_spice.yaml --set optim.lr=2e-4 --set data.train=PATH
python train.py --workdir runs/demo --resume      # continue an interrupted run exactly
python train.py --config configs/paper_omol25_stage2.yaml --init-from runs/stage1 --no-strict
python train.py --devices 4 --global-atom-budget 8192   # data-parallel: 4 local GPUs, 2,048 atoms each
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="train.py",
    description="Train E2Former-V2. Without arguments: the `small` model on the shipped demo "
    "data (configs/demo.yaml), ending with the held-out error table.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--config", help="YAML config (configs/*.yaml); default: the demo preset")
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
    help="continue the run in --workdir from its newest checkpoint "
    "(parameters, optimizer state, step, data order, RNG)",
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
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  return p


def jax_initialized_distributed() -> bool:
  import jax

  return jax.distributed.is_initialized()


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  t0 = time.time()
  import yaml

  from e2former_jax.training.config import TrainConfig, apply_overrides, get_train_config, load_config

  overrides = list(args.overrides)
  if args.global_atom_budget is not None and not args.print_config:
    import jax

    from e2former_jax.training.distributed import initialize_distributed

    initialize_distributed()
    per_host = jax.local_device_count() if args.devices is None else args.devices
    total = per_host * jax.process_count()
    if args.global_atom_budget % total:
      raise SystemExit(f"--global-atom-budget {args.global_atom_budget} does not split evenly over {total} devices")
    overrides.append(f"data.atom_budget={args.global_atom_budget // total}")
  if args.init_from:
    overrides.append(f"init.checkpoint={args.init_from}")
  if args.strict is not None:
    overrides.append(f"init.strict={'true' if args.strict else 'false'}")

  if args.config and args.preset:
    raise SystemExit("give --config or --preset, not both")
  if args.resume and not args.workdir:
    raise SystemExit("--resume needs --workdir (the run to continue)")
  if args.resume and not (args.config or args.preset or overrides):
    cfg = load_config(Path(args.workdir) / "config.yaml")
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


if __name__ == "__main__":
  sys.exit(main())
