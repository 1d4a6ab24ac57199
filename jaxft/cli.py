"""`jaxft` command line: argument parsing and error reporting only. The only place that sets jax.config flags.

Every error a user can cause is printed as one line `jaxft: error: ...` with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from jaxft import distributed, hostmem, runtime


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxft.checkpoint import RunCheckpointError
    from jaxft.config import ConfigError
    from jaxft.data.builders import DataError
    from jaxft.generate import GenerateError
    from jaxft.load import CheckpointError
    from jaxft.loop import NonFiniteError
    from jaxft.mesh import MeshError
    from jaxft.metrics import MetricsError
    from jaxft.models.hf_layout import ArchitectureError
    from jaxft.paths import RuleError
    from jaxft.sharding import ShardingError
    from jaxft.targets import TargetError

    return (
        distributed.DistributedError,
        ConfigError,
        CheckpointError,
        ArchitectureError,
        DataError,
        MeshError,
        MetricsError,
        ShardingError,
        TargetError,
        RuleError,
        RunCheckpointError,
        NonFiniteError,
        GenerateError,
        *_optional_errors(),
    )


def _optional_errors() -> tuple[type[BaseException], ...]:
    try:
        from jaxft.export import ExportError
    except ImportError:
        return ()
    return (ExportError,)


def _quiet_libraries() -> None:
    # Orbax, absl and tfds log every save and prepare at INFO, and Orbax logs a failed background write
    # with its traceback before raising it to us; the run log should be jaxft's, which reports every
    # failure itself in one line.
    # Warnings a user can do nothing about: libraries' notices about their own future APIs, and JAX's
    # warning when a data worker forks the process. Every other warning is shown.
    for module in ("orbax", "tensorflow_datasets", "grain", "flax", "optax", "transformers", "etils"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.FATAL)
    except ImportError:
        pass
    for name in ("absl", "orbax", "tensorflow_datasets", "jax", "transformers"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:
        pass
    sys.unraisablehook = _quiet_unraisable
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _quiet_unraisable(info) -> None:
    # After a failed async write, tensorstore completes its remaining futures into Orbax's closed event
    # loop; those callbacks raise "Event loop is closed" where nothing can catch them. After a failed read
    # (a damaged checkpoint, already reported in one line), Orbax's abandoned read coroutines raise again
    # when the garbage collector finalises them, at any later moment.
    if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
        return
    code = getattr(info.object, "cr_code", None)
    files = [code.co_filename] if code is not None else []
    tb = info.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if any("/orbax/" in f for f in files):
        return
    sys.__unraisablehook__(info)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxft.config import load_config
    from jaxft.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = _train_run_dir(args)
    result = train(cfg, run_dir, allow_config_change=args.allow_config_change)
    if result.stopped_by.startswith("stopped early"):
        print(f"{result.stopped_by}; the best checkpoint is kept (jaxft export --best)")
        print(f"run dir: {run_dir}")
        return 0
    if result.stopped_by:
        step = int(result.state.step)
        print(f"stopped by {result.stopped_by} at step {step}; checkpoint saved; run the same command to resume")
        return 0
    if result.start_step >= cfg.train.max_steps:
        print(f"run already complete at step {result.start_step}")
    if result.eval_metrics:
        print(
            f"test accuracy: {result.eval_metrics['eval_accuracy']:.4f}  "
            f"test loss: {result.eval_metrics['eval_loss']:.4f}"
        )
    print(f"run dir: {run_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from jaxft.checkpoint import select_step
    from jaxft.predict import predict_file

    step = select_step(Path(args.run_dir), args.step, args.best)
    n = predict_file(Path(args.run_dir), Path(args.input), Path(args.output), args.batch_size, step)
    print(f"wrote {n} predictions to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxft.checkpoint import select_step
    from jaxft.evaluate import eval_run

    step = select_step(Path(args.run_dir), args.step, args.best)
    record, out = eval_run(Path(args.run_dir), step, args.overrides)
    shown = ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_perplexity")
    values = " ".join(f"{k}={record[k]:.4f}" for k in shown if k in record)
    unit = "tokens" if "eval_perplexity" in record else "examples"
    print(f"step {step}: {values} ({int(record['eval_examples'])} {unit})")
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxft.checkpoint import select_step
    from jaxft.export import export_run

    step = select_step(Path(args.run_dir), args.step, args.best)
    run_dir, out_dir = Path(args.run_dir), Path(args.out_dir)
    out = export_run(run_dir, out_dir, step=step, dtype=args.dtype, merged=args.merged, adapter=args.adapter)
    what = " (PEFT adapter)" if args.adapter else " (adapters merged)" if args.merged else ""
    print(f"exported step {step}{what} to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxft.checkpoint import select_step
    from jaxft.generate import Sampling, check_settings, generate_run

    check_settings(args.max_new_tokens, Sampling(args.temperature, args.top_k, args.top_p))  # before any loading
    step = select_step(Path(args.run_dir), args.step, args.best)
    completions = generate_run(
        Path(args.run_dir),
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        step,
    )
    for i, (prompt, completion) in enumerate(zip(args.prompt, completions)):
        if len(completions) > 1:
            print(f"--- [{i + 1}] {prompt}")
        print(completion)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxft.plot import plot_run

    for path in plot_run(Path(args.run_dir), best=args.best):
        print(f"wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from jaxft.config import load_config
    from jaxft.plan import describe_plan, plan_target, render_target

    cfg = load_config(args.config, args.overrides)
    if not args.target:
        print(describe_plan(cfg))
        return 0
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):  # stdout holds the JSON only
        report = plan_target(cfg, args.target)
    print(json.dumps(report) if args.json else render_target(report))
    return 0


def _fingerprint(args: argparse.Namespace) -> dict:
    """What must be the same on every process: the command, its options and (train) the resolved config."""
    launch_keys = {"coordinator", "num_processes", "process_id", "local_device_ids", "init_timeout", "fn"}
    fields = {k: v for k, v in vars(args).items() if k not in launch_keys}
    if args.command == "train":
        from jaxft.config import load_config, to_json

        fields["config"] = to_json(load_config(args.config, args.overrides))
        # As given, not resolved: hosts may start from different directories (and gs:// paths are not local).
        fields["run_dir"] = str(_train_run_dir(args))
    return fields


def _train_run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir or Path("runs") / Path(args.config).stem)


def _add_step_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="a saved step (default: the latest)")
    which.add_argument("--best", action="store_true", help="the step with the best checkpoint.keep_best_metric")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune pretrained HF encoders in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune from a config file")
    p.add_argument("config")
    p.add_argument("--run-dir", default=None, help="where metrics, checkpoints and run.json go; resumed if it has any")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if the config changes the result")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    distributed.add_launch_flags(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser(
        "predict",
        help='label a JSONL file of {"text": ...} (image classifiers: {"image": path}, or a folder of images) '
        "with a run's latest checkpoint",
    )
    p.add_argument("run_dir")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    _add_step_args(p)
    distributed.add_launch_flags(p)
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("eval", help="evaluate a saved checkpoint; writes RUN_DIR/eval-<step>.json")
    p.add_argument("run_dir")
    _add_step_args(p)
    p.add_argument("overrides", nargs="*", help="data.key=value (another split or files)")
    distributed.add_launch_flags(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    _add_step_args(p)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    lora_mode = p.add_mutually_exclusive_group()
    lora_mode.add_argument("--merged", action="store_true", help="LoRA runs: fold the adapters into the base weights")
    lora_mode.add_argument(
        "--adapter", action="store_true", help="LoRA runs: write a PEFT adapter folder for the pretrained model"
    )
    distributed.add_launch_flags(p)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("generate", help="complete prompts with a causal-lm run's checkpoint (kv-cached decoding)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens of mass P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed gives the same text)")
    _add_step_args(p)
    distributed.add_launch_flags(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("plot", help="draw a run's training curves, eval metrics and confusion matrix as PNGs")
    p.add_argument("run_dir")
    p.add_argument("--best", action="store_true", help="the confusion matrix of the best eval, not the last")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser("plan", help="print parameters, shardings, freeze status and memory; builds nothing")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--target",
        default="",
        help="compile the train step for a TPU slice (v5litepod-4, v5p-8, v6e-16, v4-8, v5e:2x2, ...; needs the "
        "tpu extra) or `local`, and say whether it fits",
    )
    p.add_argument("--json", action="store_true", help="with --target: print one JSON object")
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
    log = logging.getLogger("jaxft")
    log.debug("platforms: %s", hostmem.keep_jax_off_absent_accelerators())
    log.debug("%s", runtime.set_gpu_xla_flags())
    # Before anything starts JAX's CPU backend, whose worker threads pick their malloc arenas once.
    log.debug("host malloc: %s", hostmem.tune_malloc_for_xla_cpu())
    compile_only = getattr(args, "target", None) not in (None, "local")
    log.debug("%s", runtime.configure_compilation_cache(compile_only))
    errors = _user_errors()
    launch = None
    try:
        launch = distributed.resolve_launch(args) if hasattr(args, "peer_timeout") else None
        if launch is not None:
            distributed.join(launch, args.command)
            distributed.check_same_command(_fingerprint(args))
        return args.fn(args)
    except errors as e:
        print(f"jaxft: error: {e}", file=sys.stderr)
        if launch is not None:
            distributed.leave_after_error()
        return 2
    except FileExistsError as e:
        print(f"jaxft: error: {e.filename or e}: already exists; refusing to overwrite", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxft: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script. After a failure, Orbax's writer threads and tensorstore's unfinished reads would
    print tracebacks during interpreter shutdown, after the one-line error; every jaxft file is closed by
    then, so the process leaves at once."""
    code = main()
    if code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
