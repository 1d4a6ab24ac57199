"""`jaxft` command line: argument parsing and error reporting only. The only place that sets jax.config flags.

Every error a user can cause is printed as one line `jaxft: error: ...` with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxft.checkpoint import RunCheckpointError
    from jaxft.config import ConfigError
    from jaxft.data.builders import DataError
    from jaxft.load import CheckpointError
    from jaxft.mesh import MeshError
    from jaxft.models.bert_hf import ArchitectureError
    from jaxft.paths import RuleError
    from jaxft.sharding import ShardingError

    return (
        ConfigError,
        CheckpointError,
        ArchitectureError,
        DataError,
        MeshError,
        ShardingError,
        RuleError,
        RunCheckpointError,
    )


def _quiet_libraries() -> None:
    # Orbax, absl and tfds log every save and prepare at INFO; the run log should be jaxft's.
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    for name in ("absl", "orbax", "tensorflow_datasets", "jax", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _maybe_distributed() -> None:
    """On a multi-host TPU slice (or with an explicit coordinator), join the other processes first."""
    import jax

    multi_host = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")
    if multi_host:
        jax.distributed.initialize()


def cmd_train(args: argparse.Namespace) -> int:
    from jaxft.config import load_config
    from jaxft.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    result = train(cfg, run_dir)
    if result.eval_metrics:
        print(
            f"test accuracy: {result.eval_metrics['eval_accuracy']:.4f}  "
            f"test loss: {result.eval_metrics['eval_loss']:.4f}"
        )
    print(f"run dir: {run_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from jaxft.predict import predict_file

    n = predict_file(Path(args.run_dir), Path(args.input), Path(args.output), args.batch_size, args.step)
    print(f"wrote {n} predictions to {args.output}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from jaxft.config import load_config
    from jaxft.plan import describe_plan

    print(describe_plan(load_config(args.config, args.overrides)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune pretrained HF encoders in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune from a config file")
    p.add_argument("config")
    p.add_argument("--run-dir", default=None, help="where metrics, checkpoints and run.json go")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("predict", help='label a JSONL file of {"text": ...} with a run\'s latest checkpoint')
    p.add_argument("run_dir")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step", type=int, default=None)
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("plan", help="print parameters, shardings, freeze status and memory; builds nothing")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after --run-dir; argparse alone stops collecting positionals at an option.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _quiet_libraries()
    errors = _user_errors()
    try:
        if args.command == "train":
            _maybe_distributed()
        return args.fn(args)
    except errors as e:
        print(f"jaxft: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"jaxft: error: {e.filename or e}: already exists; refusing to overwrite", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
