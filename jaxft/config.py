"""Frozen, sectioned run configuration: Python config files, dotted overrides, validation, and which keys a resumed
run may change.

Owns what a run may be told and checks it; it must not import jax or build anything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from jaxft import axes
from jaxft.config_values import ConfigError, coerce_value, field_types

# Field metadata: a key that only changes what is logged or kept, where, or how the math is laid out on devices.
# Any other key alters the result, and a resume with it changed is refused unless asked for (--allow-config-change).
RESUMABLE = "resumable"


def _resumable(default: Any) -> Any:
    return dataclasses.field(default=default, metadata={RESUMABLE: True})


@dataclasses.dataclass(frozen=True)
class FreezeRule:
    """Parameters whose '/'-joined path `pattern` fully matches are trained ("train") or frozen ("freeze"); trained
    ones at `lr_multiplier` × the learning rate. Config files may write one as a tuple: (pattern, action) or
    (pattern, "train", lr_multiplier)."""

    pattern: str
    action: str  # "train" | "freeze"
    lr_multiplier: float = 1.0

    @property
    def trains(self) -> bool:
        return self.action == "train"

    @classmethod
    def of(cls, i: int, rule: Any) -> FreezeRule:
        """A rule from a FreezeRule or its tuple / list form; ConfigError naming freeze.rules[i] otherwise."""
        if isinstance(rule, FreezeRule):
            rule = rule.to_json()
        ok = isinstance(rule, (tuple, list)) and len(rule) in (2, 3) and isinstance(rule[0], str)
        if ok and len(rule) == 2:
            ok = rule[1] in ("train", "freeze")
        elif ok:
            m = rule[2]
            ok = rule[1] == "train" and isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0
        if not ok:
            shown = tuple(rule) if isinstance(rule, list) else rule
            raise ConfigError(
                f"freeze.rules[{i}]: {shown!r} is not (regex, 'train'|'freeze') or (regex, 'train', lr_multiplier>0)"
            )
        return cls(rule[0], rule[1], float(rule[2])) if len(rule) == 3 else cls(rule[0], rule[1])

    def to_json(self) -> list[Any]:
        """The tuple form as a list: [pattern, action], or [pattern, "train", lr_multiplier] when it is not 1."""
        return [self.pattern, self.action] + ([self.lr_multiplier] if self.lr_multiplier != 1.0 else [])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    source: str = "minilm"  # local folder, hub id, or "minilm" (the bundled all-MiniLM-L6-v2)
    task: str = "sequence-classification"  # or "token-classification" (encoders), "causal-lm" (decoders)
    num_labels: int = 0  # 0: take it from data.label_names
    param_dtype: str = "float32"
    # "auto": bf16 compute with fp32 parameters on TPUs and GPUs, fp32 on CPUs; or "float32" / "bfloat16"
    compute_dtype: str = "auto"
    remat: str = _resumable("none")  # recompute activations in the backward pass: none | full | dots_saveable | ...
    dropout_rate: float = -1.0  # -1: the checkpoint's hidden_dropout_prob
    # Decoders and ViT: "true" stacks the layers under one lax.scan (compile time flat in depth), "false" keeps a
    # module per layer (faster steps on CPUs, where XLA copies each layer's slice in and out of the stack), "auto":
    # scanned on TPUs and GPUs, per layer on CPUs.
    scan_layers: str = "auto"
    frozen_dtype: str = ""  # storage dtype of frozen parameters ("" = param_dtype; "bfloat16" halves a LoRA base)
    # Causal LM: the LM head and loss run over this many positions of each row at a time, recomputed in the
    # backward pass, so [batch, seq, vocab] logits never exist at once (large vocabularies). 0 = all at once.
    logits_chunk: int = _resumable(0)

    def __post_init__(self):
        if isinstance(self.scan_layers, bool) or str(self.scan_layers).lower() in ("true", "false"):
            object.__setattr__(self, "scan_layers", str(self.scan_layers).lower())  # it was a switch before "auto"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no adapters
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input while training
    # Regexes over linear layers' module paths (`jaxft plan` lists them, e.g. layers/self_attn/q_proj).
    targets: tuple[str, ...] = (r".*(q|k|v|o)_proj",)


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    # Parameters allowed to keep their fresh init (a new head). Anything else missing is an error.
    new_params: tuple[str, ...] = (r"classifier/.*",)
    # Parameters initialised fresh even where the checkpoint holds them (a recipe's new head), and fresh
    # parameters that start at zero rather than their random init (big_vision's zero-init head).
    reinit_params: tuple[str, ...] = ()
    zero_init_params: tuple[str, ...] = ()
    # Checkpoint tensors that may be present but unused (e.g. a pretraining head).
    ignore_unused: tuple[str, ...] = (r"cls\..*", r"lm_head\..*", r".*position_ids")
    # Record each pretrained file's sha256 with the run (a resume warns when they changed, and an adapter-only
    # checkpoint refuses changed files). false skips hashing a checkpoint too big to read twice.
    hash_files: bool = _resumable(True)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = _resumable(-1)  # -1: all devices not used by the other axes
    fsdp: int = _resumable(1)
    tensor: int = _resumable(1)
    # Logical axis -> mesh axis (or None for replicated). First match wins.
    rules: tuple[tuple[str, Any], ...] = _resumable(
        (
            (axes.BATCH, ("data", "fsdp")),
            (axes.VOCAB, "tensor"),
            (axes.EMBED, "fsdp"),
            (axes.HEADS, "tensor"),
            (axes.MLP, "tensor"),
            (axes.KV, None),
            (axes.SEQ, None),
            (axes.LABELS, None),
            (axes.NORM, None),
            (axes.POSITIONS, None),
            (axes.TYPES, None),
            (axes.LAYERS, None),  # the stacked-layer axis of scanned decoders
            (axes.KV_HEADS, "tensor"),  # grouped-query attention's key/value heads
        )
    )


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    # Ordered rules (FreezeRule, or its tuple form); first match wins; every parameter must be covered.
    rules: tuple[FreezeRule, ...] = (FreezeRule(r".*", "train"),)
    # Gradual unfreezing: every K steps one more trainable layer group (top down) joins. 0 = off.
    unfreeze_every_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.rules, (tuple, list)):
            raise ConfigError(f"freeze.rules: expected a list of rules, got {self.rules!r}")
        object.__setattr__(self, "rules", tuple(FreezeRule.of(i, r) for i, r in enumerate(self.rules)))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | adafactor
    learning_rate: float = 5e-5
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    end_learning_rate_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    clip_grad_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 32  # global, across all processes and devices
    grad_accum_steps: int = 1  # microbatches inside one step
    seed: int = 0
    log_every_steps: int = _resumable(10)
    eval_every_steps: int = _resumable(50)  # 0: only at the end
    eval_batch_size: int = _resumable(64)
    nonfinite: str = "halt"  # a non-finite loss/gradient: "halt" the run, or "skip" the update and go on
    max_nonfinite_steps: int = 10  # skip mode: halt after this many non-finite steps in a row
    sample_max_new_tokens: int = _resumable(32)  # causal-lm: new tokens per data.sample_prompts completion at each eval
    # Stop once this many evals in a row did not improve early_stopping_metric by more than min_delta (0: off).
    early_stopping_patience: int = 0
    early_stopping_metric: str = ""  # "" = checkpoint.keep_best_metric (and its mode), else eval_loss
    early_stopping_min_delta: float = 0.0
    # Where metrics go: "jsonl" (RUN_DIR/metrics.jsonl), "tensorboard" (RUN_DIR/tensorboard), "wandb" (the wandb
    # extra; a resumed run continues the same W&B run).
    report_to: tuple[str, ...] = _resumable(("jsonl", "tensorboard"))
    wandb_project: str = _resumable("jaxft")
    wandb_run_name: str = _resumable("")  # "" = the run dir's name


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "reviews" (bundled), "files" (your JSONL/CSV via train_files/eval_files), "imagefolder" (train_dir/eval_dir,
    # one subfolder of images per class), or a tfds name like "glue/sst2" or "oxford_flowers102".
    dataset: str = "reviews"
    data_dir: str = ""  # tfds data_dir ("" = RUN_DIR/tfds for files/reviews, tfds default otherwise)
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = _resumable(())
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    label_names: tuple[str, ...] = ()  # () = read from the dataset's ClassLabel
    train_split: str = "train"
    eval_split: str = _resumable("test")
    max_length: int = 128
    # Each batch is padded to the smallest of these row lengths that holds its longest row, and rows are grouped
    # by length inside shuffled mega-batches (sequence/token classification; causal-lm with packing=false).
    # (-1,) = the powers of two from 16 up to max_length, and max_length; () = every batch padded to max_length.
    length_buckets: tuple[int, ...] = (-1,)
    # Image models: the side of the square images fed to the model; 0 keeps the checkpoint's image_size. Another
    # size resamples the pretrained position embeddings to its patch grid.
    image_size: int = 0
    # Image classification. data.dataset="imagefolder": the folders holding one subfolder per class (the class
    # names, sorted, are the labels unless label_names orders them); "files": rows of {image_column: path
    # (relative to the file), label_column: label}.
    train_dir: str = ""
    eval_dir: str = _resumable("")
    image_column: str = "image"
    bad_images: str = "error"  # an unreadable or truncated image: "error" names it and stops; "skip" counts it
    # Train augmentation: an inception-style random resized crop (the crop's share of the image's area, and its
    # aspect-ratio range), a horizontal flip (false where a flip changes the label), RandAugment-style ops
    # (randaugment_ops ops per image at randaugment_magnitude of 10; 0 ops = off), and mixup / cutmix (Beta
    # alphas; 0 = off; with both, each pair of images takes one of the two).
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    crop_ratio: tuple[float, ...] = (0.75, 4 / 3)
    flip: bool = True
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Eval: the shorter side resized to image_size / crop_fraction, then the centre image_size square.
    crop_fraction: float = _resumable(0.875)
    # Normalisation; () = the checkpoint's preprocessor_config.json (0.5, 0.5, 0.5 without one).
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    workers: int = _resumable(0)  # threads that decode and augment images (0 = one per CPU core, at most 16)
    shuffle_seed: int = 0
    # Decoder LLMs (model.task="causal-lm"): JSONL of {"prompt", "completion"}, chat {"messages": [...]}, or
    # {"text"}; or .txt files (documents separated by blank lines).
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    train_on_prompt: bool = False  # False: the loss covers completion/assistant tokens only
    packing: bool = True  # several examples per row, attention never crossing them
    truncation: str = "error"  # an example longer than max_length: "error", "left" (keep its end), "drop"
    chat_template: str = ""  # Jinja chat template; "" = the tokenizer's own, or a simple built-in one if it has none
    # Causal-lm: at every eval, greedy completions of these prompts (rendered as training rendered prompts) are
    # appended to RUN_DIR/samples.jsonl. On the command line a JSON list, or comma-separated.
    sample_prompts: tuple[str, ...] = _resumable(())


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = _resumable(100)  # 0: only at the end
    keep: int = _resumable(3)  # the latest K checkpoints are kept ...
    keep_best_metric: str = _resumable("eval_loss")  # ... plus the best by this eval metric ("" = none)
    keep_best_mode: str = _resumable("auto")  # min | max | auto (min for *loss*, max otherwise)
    async_save: bool = _resumable(True)
    # False: checkpoints hold only the trained parameters (e.g. LoRA adapters) and their optimizer state; the
    # frozen ones are read back from the pretrained files, recorded by path and sha256, whenever it is restored.
    save_frozen: bool = _resumable(True)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    load: LoadConfig = LoadConfig()
    lora: LoraConfig = LoraConfig()
    mesh: MeshConfig = MeshConfig()
    freeze: FreezeConfig = FreezeConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)

    def derive(self, **sections: dict[str, Any]) -> Config:
        """This config with the named sections' fields replaced, e.g. derive(train={"max_steps": 10}); keys and
        values are checked as command-line overrides are."""
        for name, fields in sections.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"{name}: expected a dict of {name} fields, got {fields!r}")
        return apply_overrides(self, {f"{name}.{k}": v for name, fields in sections.items() for k, v in fields.items()})


_CHOICES = {
    "model.task": ("sequence-classification", "token-classification", "causal-lm", "image-classification"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("auto", "float32", "bfloat16"),
    "model.frozen_dtype": ("", "float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),
    "model.scan_layers": ("auto", "true", "false"),
    "optim.name": ("adamw", "sgd", "adafactor"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "checkpoint.keep_best_mode": ("auto", "min", "max"),
    "train.nonfinite": ("halt", "skip"),
    "data.truncation": ("error", "left", "drop"),
    "data.bad_images": ("error", "skip"),
    "checkpoint.keep_best_metric": ("", "eval_loss", "eval_accuracy", "eval_macro_f1", "eval_perplexity"),
    "train.early_stopping_metric": ("", "eval_loss", "eval_accuracy", "eval_macro_f1", "eval_perplexity"),
}
SINKS = ("jsonl", "tensorboard", "wandb")  # train.report_to's choices
# The eval metrics each task computes (what early stopping and the best checkpoint can follow).
EVAL_METRICS = {
    "sequence-classification": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
    "token-classification": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
    "causal-lm": ("eval_loss", "eval_accuracy", "eval_perplexity"),
    "image-classification": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
}
_POSITIVE = (
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.log_every_steps",
    "train.eval_batch_size",
    "train.max_nonfinite_steps",
    "train.sample_max_new_tokens",
    "data.max_length",
    "checkpoint.keep",
)
_NON_NEGATIVE = (
    "lora.rank",
    "data.image_size",
    "data.randaugment_ops",
    "data.randaugment_magnitude",
    "data.mixup_alpha",
    "data.cutmix_alpha",
    "data.workers",
    "lora.dropout",
    "train.eval_every_steps",
    "checkpoint.every_steps",
    "optim.warmup_steps",
    "freeze.unfreeze_every_steps",
    "optim.clip_grad_norm",
    "optim.weight_decay",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
)


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Applies dotted `section.key=value` overrides, checking that each key exists and each value's type."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for key, raw in items:
        section_name, _, field = key.partition(".")
        sections = {f.name for f in dataclasses.fields(Config)}
        if section_name not in sections or not field:
            raise ConfigError(f"unknown config key {key!r}; sections are: {', '.join(sorted(sections))}")
        section = getattr(cfg, section_name)
        types_ = field_types(type(section))
        if field not in types_:
            raise ConfigError(f"unknown config key {key!r}; {section_name} has: {', '.join(sorted(types_))}")
        value = coerce_value(key, raw, types_[field])
        cfg = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{field: value})})
    return cfg


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.strip(), value


def validate(cfg: Config) -> Config:
    """Checks values that types alone cannot; raises ConfigError naming the key."""
    for section in dataclasses.fields(Config):
        obj = getattr(cfg, section.name)
        for name, tp in field_types(type(obj)).items():
            key = f"{section.name}.{name}"
            value = getattr(obj, name)
            coerce_value(key, value, tp)  # type check values that came from config files
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
            if key in _POSITIVE and value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
            if key in _NON_NEGATIVE and value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}: must be a positive size or -1 (the rest), got {size}")
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}"
        )
    if cfg.model.dropout_rate != -1.0 and not 0.0 <= cfg.model.dropout_rate < 1.0:
        raise ConfigError(
            f"model.dropout_rate: must be in [0, 1), or -1 for the checkpoint's own, got {cfg.model.dropout_rate}"
        )
    if cfg.lora.rank and not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.data.dataset == "files" and not cfg.data.train_files:
        raise ConfigError("data.train_files: required when data.dataset='files'")
    _check_images(cfg)
    _check_early_stopping(cfg)
    length_buckets(cfg.data)
    unknown = [sink for sink in cfg.train.report_to if sink not in SINKS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown sink {unknown[0]!r} (known: {', '.join(SINKS)})")
    return cfg


def _check_images(cfg: Config) -> None:
    data = cfg.data
    if data.dataset == "imagefolder":
        if cfg.model.task != "image-classification":
            raise ConfigError("data.dataset='imagefolder' is for model.task='image-classification'")
        if not data.train_dir:
            raise ConfigError("data.train_dir: required when data.dataset='imagefolder'")
    if cfg.model.task != "image-classification":
        return
    for key, low, high in (("crop_scale", 0.0, 1.0), ("crop_ratio", 0.0, float("inf"))):
        pair = getattr(data, key)
        if len(pair) != 2 or not low < pair[0] <= pair[1] <= high:
            raise ConfigError(f"data.{key}: expected [min, max] with {low} < min <= max <= {high}, got {list(pair)}")
    if not 0.0 < data.crop_fraction <= 1.0:
        raise ConfigError(f"data.crop_fraction: must be in (0, 1], got {data.crop_fraction}")
    if data.randaugment_magnitude > 10:
        raise ConfigError(f"data.randaugment_magnitude: must be 0 to 10, got {data.randaugment_magnitude}")
    for key in ("image_mean", "image_std"):
        values = getattr(data, key)
        if values and (len(values) != 3 or (key == "image_std" and min(values) <= 0)):
            raise ConfigError(f"data.{key}: expected 3 values (one per RGB channel), got {list(values)}")


def length_buckets(data: DataConfig) -> tuple[int, ...]:
    """The row lengths batches are padded to, ascending, max_length last; () when bucketing is off."""
    buckets = data.length_buckets
    if buckets == (-1,):
        return tuple(b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b < data.max_length) + (
            data.max_length,
        )
    if any(b < 1 for b in buckets):
        raise ConfigError(f"data.length_buckets: {list(buckets)}: every bucket must be a positive row length")
    if any(b >= c for b, c in zip(buckets, buckets[1:])):
        raise ConfigError(f"data.length_buckets: {list(buckets)} is not increasing")
    if buckets and buckets[-1] > data.max_length:
        raise ConfigError(f"data.length_buckets: bucket {buckets[-1]} is longer than data.max_length={data.max_length}")
    return buckets + (data.max_length,) if buckets and buckets[-1] < data.max_length else buckets


def early_stopping_metric(cfg: Config) -> tuple[str, str]:
    """(metric, "min" | "max") that early stopping follows."""
    metric = cfg.train.early_stopping_metric or cfg.checkpoint.keep_best_metric or "eval_loss"
    if metric == cfg.checkpoint.keep_best_metric and cfg.checkpoint.keep_best_mode != "auto":
        return metric, cfg.checkpoint.keep_best_mode
    return metric, "min" if "loss" in metric or "perplexity" in metric else "max"


def _check_early_stopping(cfg: Config) -> None:
    if not cfg.train.early_stopping_patience:
        return
    if not cfg.train.eval_every_steps:
        raise ConfigError("train.early_stopping_patience: needs evals during training; set train.eval_every_steps > 0")
    metric, _ = early_stopping_metric(cfg)
    computed = EVAL_METRICS.get(cfg.model.task, ())
    if computed and metric not in computed:
        raise ConfigError(
            f"train.early_stopping_metric: {metric!r} is never computed for model.task={cfg.model.task!r} "
            f"(its evals give {', '.join(computed)})"
        )


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> Config:
    """Loads a Python config file defining `config` (a Config), applies overrides, validates."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # a user's config file can fail in any way; name it
        raise ConfigError(f"config file {str(path)!r} failed to run: {type(e).__name__}: {e}") from None
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, Config):
        raise ConfigError(f"config file {str(path)!r} must define `config = Config(...)`")
    return validate(apply_overrides(cfg, overrides))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested dicts; freeze rules in their tuple form, as config files write them."""
    d = dataclasses.asdict(cfg)
    d["freeze"]["rules"] = tuple(tuple(rule.to_json()) for rule in cfg.freeze.rules)
    return d


def to_json(cfg: Config) -> dict[str, Any]:
    """to_dict() as JSON holds it (tuples as lists): what run.json and checkpoints record."""
    return json.loads(json.dumps(to_dict(cfg), default=str))


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuilds a Config from to_dict() output (e.g. a run dir's config.json). A key that a run of an older jaxft
    lacks had its default then; a key this jaxft no longer has is dropped."""
    sections = {}
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
        values = d.get(section.name, {})
        known = field_types(cls)
        kwargs = {k: _from_json(v) for k, v in values.items() if k in known}
        if section.name == "model" and isinstance(kwargs.get("remat"), bool):  # runs saved before policies
            kwargs["remat"] = coerce_value("model.remat", kwargs["remat"], str)
        sections[section.name] = cls(**kwargs)
    return Config(**sections)


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    return v


def base(**sections: dict[str, Any]) -> Config:
    """The base config every config derives from (jaxft's defaults), with the named sections' fields replaced:
    `base(model={"source": "gpt2", "task": "causal-lm"}, train={"max_steps": 300})`. Each key and value is checked
    as a command-line override is."""
    return Config().derive(**sections)


def resumable_keys() -> set[str]:
    """'section.key' of every field marked resumable: a resumed run may change it without changing the result."""
    return {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(type(getattr(Config(), section.name)))
        if f.metadata.get(RESUMABLE)
    }


def config_changes(saved: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that alters the math, of a checkpoint's recorded config
    (to_json form) against `cfg`."""
    before, now, resumable = to_json(from_dict(saved)), to_json(cfg), resumable_keys()
    return [
        (f"{section}.{key}", before[section][key], value)
        for section, values in now.items()
        for key, value in values.items()
        if before[section][key] != value and f"{section}.{key}" not in resumable
    ]


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FreezeConfig",
    "FreezeRule",
    "LoadConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "base",
    "config_changes",
    "from_dict",
    "load_config",
    "to_dict",
    "to_json",
    "validate",
]
