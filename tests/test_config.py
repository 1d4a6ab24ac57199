"""Config: defaults, config files, dotted overrides and their coercion, freeze rules, validation, resume keys."""

import dataclasses
import re
from pathlib import Path

import pytest

from jaxft import config as config_lib
from jaxft.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    FreezeConfig,
    FreezeRule,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    base,
    config_changes,
    from_dict,
    load_config,
    resumable_keys,
    to_dict,
    to_json,
    validate,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write_config(tmp_path: Path, body: str, name: str = "cfg.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_defaults():
    cfg = Config()
    assert cfg.model == ModelConfig(
        source="minilm",
        task="sequence-classification",
        num_labels=0,
        param_dtype="float32",
        compute_dtype="auto",  # bf16 on TPUs and GPUs, fp32 on CPUs (setup.compute_dtype)
        remat="none",
        dropout_rate=-1.0,
        scan_layers="auto",  # scanned on TPUs and GPUs, per layer on CPUs (setup.scan_layers)
        frozen_dtype="",
        logits_chunk=0,
    )
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)
    assert cfg.mesh.rules[0] == ("batch", ("data", "fsdp"))
    assert cfg.freeze.rules == (FreezeRule(".*", "train", 1.0),)
    assert cfg.optim == OptimConfig(
        name="adamw",
        learning_rate=5e-5,
        schedule="cosine",
        warmup_steps=0,
        end_learning_rate_ratio=0.0,
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        momentum=0.9,
        clip_grad_norm=1.0,
    )
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum_steps) == (100, 32, 1)
    assert cfg.lora.rank == 0 and cfg.lora.targets == (r".*(q|k|v|o)_proj",)
    assert cfg.load.new_params == (r"classifier/.*",)
    assert (cfg.data.dataset, cfg.data.max_length, cfg.data.truncation) == ("reviews", 128, "error")
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep, cfg.checkpoint.keep_best_metric) == (100, 3, "eval_loss")
    assert validate(cfg) is cfg


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.max_steps = 3


def test_load_config_file_with_base(tmp_path):
    path = write_config(
        tmp_path,
        "from jaxft.config import base\n"
        "config = base(model={'source': 'gpt2', 'task': 'causal-lm'}, train={'max_steps': 7, 'batch_size': '16'},\n"
        "              data={'train_files': 'a.txt,b.txt'})\n",
    )
    cfg = load_config(path)
    assert (cfg.model.source, cfg.model.task) == ("gpt2", "causal-lm")
    assert (cfg.train.max_steps, cfg.train.batch_size) == (7, 16)
    assert cfg.data.train_files == ("a.txt", "b.txt")
    assert cfg.optim == OptimConfig()


def test_load_config_file_with_derive(tmp_path):
    path = write_config(
        tmp_path,
        "from jaxft.config import Config, base\n"
        "parent = base(optim={'learning_rate': 1e-3})\n"
        "config = parent.derive(optim={'warmup_steps': 5}, checkpoint={'keep': 1})\n",
    )
    cfg = load_config(path)
    assert (cfg.optim.learning_rate, cfg.optim.warmup_steps) == (1e-3, 5)
    assert cfg.checkpoint.keep == 1


def test_load_config_plain_config_constructor(tmp_path):
    path = write_config(
        tmp_path,
        "from jaxft.config import Config, TrainConfig\nconfig = Config(train=TrainConfig(max_steps=9))\n",
    )
    assert load_config(path).train.max_steps == 9


def test_load_config_applies_overrides_then_validates(tmp_path):
    path = write_config(tmp_path, "from jaxft.config import base\nconfig = base(train={'max_steps': 7})\n")
    assert load_config(path, ["train.max_steps=3", "optim.name=sgd"]).train.max_steps == 3
    assert load_config(path, {"train.seed": 4}).train.seed == 4
    with pytest.raises(ConfigError, match=r"^train\.max_steps: must be > 0, got -3$"):
        load_config(path, ["train.max_steps=-3"])


def test_load_config_validates_the_file_itself(tmp_path):
    path = write_config(tmp_path, "from jaxft.config import base\nconfig = base(optim={'name': 'lion'})\n")
    with pytest.raises(ConfigError, match=r"optim\.name: 'lion' is not one of adamw, sgd, adafactor"):
        load_config(path)


def test_load_config_missing_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ConfigError, match=re.escape(f"config file '{missing}' does not exist")):
        load_config(missing)


def test_load_config_file_that_raises(tmp_path):
    path = write_config(tmp_path, "x = 1 / 0\n")
    with pytest.raises(ConfigError, match="failed to run: ZeroDivisionError: division by zero"):
        load_config(path)


def test_load_config_file_raising_config_error_keeps_its_message(tmp_path):
    path = write_config(tmp_path, "from jaxft.config import base\nconfig = base(train={'bogus': 1})\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'train\.bogus'; train has: batch_size, "):
        load_config(path)


@pytest.mark.parametrize("body", ["x = 1\n", "config = {'train': {}}\n"])
def test_load_config_file_without_a_config(tmp_path, body):
    with pytest.raises(ConfigError, match=r"must define `config = Config\(...\)`"):
        load_config(write_config(tmp_path, body))


@pytest.mark.parametrize(
    "override, section, field, expected",
    [
        ("train.max_steps=12", "train", "max_steps", 12),
        ("train.max_steps= 12", "train", "max_steps", 12),
        ("optim.learning_rate=3e-4", "optim", "learning_rate", 3e-4),
        ("optim.warmup_steps=0", "optim", "warmup_steps", 0),
        ("data.max_length=64", "data", "max_length", 64),
        ("optim.b1=1", "optim", "b1", 1.0),
        ("model.scan_layers=false", "model", "scan_layers", "false"),
        ("model.scan_layers=No", "model", "scan_layers", "false"),
        ("model.scan_layers=True", "model", "scan_layers", "true"),
        ("model.scan_layers=auto", "model", "scan_layers", "auto"),
        ("data.packing=0", "data", "packing", False),
        ("load.hash_files=YES", "load", "hash_files", True),
        ("data.train_on_prompt=1", "data", "train_on_prompt", True),
        ("model.source=/tmp/x=y", "model", "source", "/tmp/x=y"),
        ("data.train_files=a.jsonl,b.jsonl", "data", "train_files", ("a.jsonl", "b.jsonl")),
        ("data.train_files=", "data", "train_files", ()),
        ('data.sample_prompts=["hi, there", "x"]', "data", "sample_prompts", ("hi, there", "x")),
        ("lora.targets=[]", "lora", "targets", ()),
        ("model.remat=true", "model", "remat", "full"),
        ("model.remat=False", "model", "remat", "none"),
        ("model.remat=dots_saveable", "model", "remat", "dots_saveable"),
        ('mesh.rules=[["batch", "data"], ["embed", null]]', "mesh", "rules", (("batch", "data"), ("embed", None))),
    ],
)
def test_override_coercion(override, section, field, expected):
    value = getattr(getattr(apply_overrides(Config(), [override]), section), field)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_in_order_and_leave_other_fields():
    cfg = apply_overrides(Config(), ["train.max_steps=5", "train.max_steps=6", "train.seed=2"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.train.batch_size) == (6, 2, 32)
    assert cfg.optim == OptimConfig()


def test_dict_overrides_take_python_values():
    cfg = apply_overrides(Config(), {"optim.learning_rate": 1, "data.label_names": ["neg", "pos"], "lora.rank": "8"})
    assert cfg.optim.learning_rate == 1.0 and type(cfg.optim.learning_rate) is float
    assert cfg.data.label_names == ("neg", "pos")
    assert cfg.lora.rank == 8


def test_freeze_rules_override_become_rules():
    cfg = apply_overrides(Config(), ['freeze.rules=[["embeddings/.*", "freeze"], [".*", "train", 2]]'])
    assert cfg.freeze.rules == (FreezeRule("embeddings/.*", "freeze"), FreezeRule(".*", "train", 2.0))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer, got '1.5'"),
        ("optim.learning_rate=fast", "optim.learning_rate: expected a number, got 'fast'"),
        ("model.scan_layers=maybe", "model.scan_layers: expected auto, true or false, got 'maybe'"),
        ('data.train_files=["a",', "data.train_files: not a valid JSON list"),
        ("data.train_files=[1]", "data.train_files: expected a string, got 1"),
        ("train.bogus=1", "unknown config key 'train.bogus'; train has: "),
        ("nosection.x=1", "unknown config key 'nosection.x'; sections are: checkpoint, data, freeze, load, lora, "),
        ("train=3", "unknown config key 'train'; sections are: "),
        ("train.max_steps", "override 'train.max_steps' is not of the form section.key=value"),
        ("=3", "override '=3' is not of the form section.key=value"),
        ("freeze.rules=a", "freeze.rules[0]: 'a' is not (regex, 'train'|'freeze')"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.max_steps", True, "train.max_steps: expected an integer, got True"),
        ("train.max_steps", 2.5, "train.max_steps: expected an integer, got 2.5"),
        ("optim.learning_rate", False, "optim.learning_rate: expected a number, got False"),
        ("model.source", 3, "model.source: expected a string, got 3"),
        ("data.train_files", 3, "data.train_files: expected a list, got 3"),
        ("lora.targets", ["a", 1], "lora.targets: expected a string, got 1"),
    ],
)
def test_bad_python_override_values(key, value, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {key: value})
    assert str(e.value) == message


def test_derive_checks_its_arguments():
    assert Config().derive(train={"max_steps": "4"}).train.max_steps == 4
    with pytest.raises(ConfigError, match="^train: expected a dict of train fields, got 5$"):
        Config().derive(train=5)
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus\.x'"):
        base(bogus={"x": 1})
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lr'; optim has: b1, b2, clip_grad_norm"):
        base(optim={"lr": 1.0})


def test_base_is_the_defaults():
    assert base() == Config()
    assert base(train={"max_steps": 3}) == Config(train=TrainConfig(max_steps=3))


def test_replace_swaps_whole_sections():
    cfg = Config().replace(train=TrainConfig(max_steps=2))
    assert cfg.train == TrainConfig(max_steps=2) and cfg.optim == OptimConfig()


@pytest.mark.parametrize(
    "rule, expected",
    [
        (("a/.*", "freeze"), FreezeRule("a/.*", "freeze", 1.0)),
        (["a/.*", "train"], FreezeRule("a/.*", "train", 1.0)),
        (("a/.*", "train", 2), FreezeRule("a/.*", "train", 2.0)),
        (("a/.*", "train", 0.5), FreezeRule("a/.*", "train", 0.5)),
        (FreezeRule("b", "train", 3.0), FreezeRule("b", "train", 3.0)),
    ],
)
def test_freeze_rule_of(rule, expected):
    got = FreezeRule.of(0, rule)
    assert got == expected and type(got.lr_multiplier) is float


@pytest.mark.parametrize(
    "rule, shown",
    [
        (("a", "bogus"), "('a', 'bogus')"),
        (["a", "skip"], "('a', 'skip')"),
        (("a",), "('a',)"),
        (("a", "train", 1.0, 2.0), "('a', 'train', 1.0, 2.0)"),
        ((3, "train"), "(3, 'train')"),
        (("a", "freeze", 2.0), "('a', 'freeze', 2.0)"),
        (("a", "train", 0), "('a', 'train', 0)"),
        (("a", "train", -1.0), "('a', 'train', -1.0)"),
        (("a", "train", True), "('a', 'train', True)"),
        (("a", "train", "2"), "('a', 'train', '2')"),
        ("a", "'a'"),
        (FreezeRule("a", "frozen"), "('a', 'frozen')"),
    ],
)
def test_freeze_rule_of_rejects(rule, shown):
    with pytest.raises(ConfigError) as e:
        FreezeRule.of(3, rule)
    assert str(e.value) == (
        f"freeze.rules[3]: {shown} is not (regex, 'train'|'freeze') or (regex, 'train', lr_multiplier>0)"
    )


def test_freeze_rule_to_json_and_trains():
    assert FreezeRule("a", "train").to_json() == ["a", "train"]
    assert FreezeRule("a", "train", 1.0).to_json() == ["a", "train"]
    assert FreezeRule("a", "train", 0.25).to_json() == ["a", "train", 0.25]
    assert FreezeRule("a", "freeze").to_json() == ["a", "freeze"]
    assert FreezeRule("a", "train").trains and not FreezeRule("a", "freeze").trains


def test_freeze_config_coerces_tuple_rules():
    cfg = FreezeConfig(rules=[("emb/.*", "freeze"), ["x", "train", 0.5], FreezeRule(".*", "train")])
    assert cfg.rules == (FreezeRule("emb/.*", "freeze"), FreezeRule("x", "train", 0.5), FreezeRule(".*", "train"))
    assert type(cfg.rules) is tuple


def test_freeze_config_names_the_bad_rule_index():
    with pytest.raises(ConfigError, match=r"^freeze\.rules\[1\]: \('x', 'thaw'\) is not"):
        FreezeConfig(rules=((".*", "train"), ("x", "thaw")))
    with pytest.raises(ConfigError, match="^freeze.rules: expected a list of rules, got 'x'$"):
        FreezeConfig(rules="x")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.task=regression"], "model.task: 'regression' is not one of sequence-classification, "),
        (["model.param_dtype=float16"], "model.param_dtype: 'float16' is not one of float32, bfloat16"),
        (["model.remat=sometimes"], "model.remat: 'sometimes' is not one of none, full, dots_saveable"),
        (["optim.schedule=step"], "optim.schedule: 'step' is not one of cosine, linear, constant"),
        (["checkpoint.keep_best_mode=low"], "checkpoint.keep_best_mode: 'low' is not one of auto, min, max"),
        (["checkpoint.keep_best_metric=acc"], "checkpoint.keep_best_metric: 'acc' is not one of , eval_loss, "),
        (["train.nonfinite=ignore"], "train.nonfinite: 'ignore' is not one of halt, skip"),
        (["data.truncation=right"], "data.truncation: 'right' is not one of error, left, drop"),
        (["train.max_steps=0"], "train.max_steps: must be > 0, got 0"),
        (["train.batch_size=-8"], "train.batch_size: must be > 0, got -8"),
        (["checkpoint.keep=0"], "checkpoint.keep: must be > 0, got 0"),
        (["data.max_length=0"], "data.max_length: must be > 0, got 0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0, got -1"),
        (["optim.weight_decay=-0.5"], "optim.weight_decay: must be >= 0, got -0.5"),
        (["optim.clip_grad_norm=-1"], "optim.clip_grad_norm: must be >= 0, got -1.0"),
        (["lora.rank=-2"], "lora.rank: must be >= 0, got -2"),
        (["train.eval_every_steps=-1"], "train.eval_every_steps: must be >= 0, got -1"),
        (["mesh.data=0"], "mesh.data: must be a positive size or -1 (the rest), got 0"),
        (["mesh.tensor=-2"], "mesh.tensor: must be a positive size or -1 (the rest), got -2"),
        (
            ["train.batch_size=10", "train.grad_accum_steps=4"],
            "train.batch_size: 10 is not divisible by train.grad_accum_steps=4",
        ),
        (["lora.rank=4", "lora.dropout=1.0"], "lora.dropout: must be in [0, 1), got 1.0"),
        (["model.dropout_rate=1"], "model.dropout_rate: must be in [0, 1), or -1 for the checkpoint's own, got 1.0"),
        (
            ["model.dropout_rate=-0.5"],
            "model.dropout_rate: must be in [0, 1), or -1 for the checkpoint's own, got -0.5",
        ),
        (["data.dataset=files"], "data.train_files: required when data.dataset='files'"),
    ],
)
def test_validate_rejects(overrides, message):
    cfg = apply_overrides(Config(), overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.eval_every_steps=0", "checkpoint.every_steps=0", "optim.clip_grad_norm=0", "optim.weight_decay=0"],
        ["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"],
        ["train.batch_size=12", "train.grad_accum_steps=4"],
        ["lora.rank=8", "lora.dropout=0.99"],
        ["model.dropout_rate=0"],
        ["model.dropout_rate=0.1"],
        ["data.dataset=files", "data.train_files=a.jsonl"],
        ["checkpoint.keep_best_metric="],
        ["model.frozen_dtype=bfloat16", "model.compute_dtype=bfloat16"],
    ],
)
def test_validate_accepts(overrides):
    cfg = apply_overrides(Config(), overrides)
    assert validate(cfg) is cfg


def test_validate_type_checks_values_from_files():
    with pytest.raises(ConfigError, match="^model.scan_layers: expected auto, true or false, got 'maybe'$"):
        validate(Config(model=ModelConfig(scan_layers="maybe")))
    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps: expected an integer, got 3\.5$"):
        validate(Config(optim=OptimConfig(warmup_steps=3.5)))
    with pytest.raises(ConfigError, match="^data.train_files: expected a list, got 3$"):
        validate(Config(data=DataConfig(dataset="files", train_files=3)))


def _custom() -> Config:
    return Config(
        model=ModelConfig(source="/ckpt", task="causal-lm", remat="full"),
        lora=LoraConfig(rank=4, targets=("q", "v")),
        mesh=MeshConfig(data=2, fsdp=4),
        freeze=FreezeConfig(rules=(("emb/.*", "freeze"), ("head/.*", "train", 2.0), (".*", "train"))),
        optim=OptimConfig(name="sgd", learning_rate=0.1),
        train=TrainConfig(max_steps=7),
        data=DataConfig(dataset="files", train_files=("a.jsonl",), label_names=("neg", "pos")),
        checkpoint=CheckpointConfig(keep=1, async_save=False),
    )


def test_to_dict_writes_freeze_rules_as_tuples():
    d = to_dict(_custom())
    assert d["freeze"]["rules"] == (("emb/.*", "freeze"), ("head/.*", "train", 2.0), (".*", "train"))
    assert d["train"]["max_steps"] == 7 and d["data"]["train_files"] == ("a.jsonl",)
    assert set(d) == {"model", "load", "lora", "mesh", "freeze", "optim", "train", "data", "checkpoint"}


def test_to_json_uses_lists():
    d = to_json(_custom())
    assert d["freeze"]["rules"] == [["emb/.*", "freeze"], ["head/.*", "train", 2.0], [".*", "train"]]
    assert d["mesh"]["rules"][0] == ["batch", ["data", "fsdp"]]
    assert d["lora"]["targets"] == ["q", "v"]
    assert d["checkpoint"]["async_save"] is False


@pytest.mark.parametrize("cfg", [Config(), _custom()])
def test_round_trip(cfg):
    assert from_dict(to_json(cfg)) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_from_dict_fills_missing_keys_and_drops_unknown_ones():
    d = to_json(_custom())
    del d["optim"]["momentum"]
    del d["checkpoint"]
    d["train"]["retired_key"] = 1
    d["retired_section"] = {"x": 1}
    cfg = from_dict(d)
    assert cfg.optim.momentum == 0.9 and cfg.optim.name == "sgd"
    assert cfg.checkpoint == CheckpointConfig()
    assert cfg.train.max_steps == 7


@pytest.mark.parametrize("saved, now", [(True, "full"), (False, "none")])
def test_from_dict_reads_old_boolean_remat(saved, now):
    d = to_json(Config())
    d["model"]["remat"] = saved
    assert from_dict(d).model.remat == now


def test_resumable_keys():
    assert resumable_keys() == {
        "model.remat",
        "model.logits_chunk",
        "load.hash_files",
        "mesh.data",
        "mesh.fsdp",
        "mesh.tensor",
        "mesh.rules",
        "train.log_every_steps",
        "train.eval_every_steps",
        "train.eval_batch_size",
        "train.sample_max_new_tokens",
        "train.report_to",
        "train.wandb_project",
        "train.wandb_run_name",
        "data.eval_files",
        "data.eval_split",
        "data.eval_dir",
        "data.crop_fraction",
        "data.workers",
        "data.sample_prompts",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "checkpoint.keep_best_metric",
        "checkpoint.keep_best_mode",
        "checkpoint.async_save",
        "checkpoint.save_frozen",
    }


def test_config_changes_lists_only_result_changing_keys():
    saved = to_json(Config())
    cfg = apply_overrides(
        Config(),
        [
            "train.batch_size=16",
            "optim.name=sgd",
            "train.log_every_steps=3",
            "checkpoint.every_steps=4",
            "mesh.data=2",
            "mesh.fsdp=4",
            "data.eval_split=validation",
            'freeze.rules=[["emb/.*", "freeze"], [".*", "train"]]',
            "lora.targets=q,v",
        ],
    )
    assert config_changes(saved, cfg) == [
        ("lora.targets", [r".*(q|k|v|o)_proj"], ["q", "v"]),
        ("freeze.rules", [[".*", "train"]], [["emb/.*", "freeze"], [".*", "train"]]),
        ("optim.name", "adamw", "sgd"),
        ("train.batch_size", 32, 16),
    ]


def test_config_changes_none_for_same_or_resumable_only():
    cfg = _custom()
    assert config_changes(to_json(cfg), cfg) == []
    logging_only = apply_overrides(cfg, ["train.eval_batch_size=4", "checkpoint.keep=9", "model.remat=none"])
    assert config_changes(to_json(cfg), logging_only) == []


def test_config_changes_against_a_saved_config_missing_a_key():
    saved = to_json(Config())
    del saved["train"]["seed"]
    assert config_changes(saved, Config()) == []
    assert config_changes(saved, apply_overrides(Config(), ["train.seed=1"])) == [("train.seed", 0, 1)]


def test_public_names():
    assert {"Config", "ConfigError", "load_config", "config_changes", "validate"} <= set(config_lib.__all__)
    assert issubclass(ConfigError, ValueError)


def test_every_shipped_config_loads_with_its_fields():
    loaded = {p.stem: load_config(p) for p in sorted(CONFIGS.glob("*.py"))}
    assert {"base", "tiny", "minilm_sentiment", "gpt2_clm", "llama_sft_lora"} <= set(loaded)
    assert loaded["base"] == Config()

    tiny = loaded["tiny"]
    assert (tiny.model.source, tiny.mesh.data, tiny.data.dataset, tiny.data.max_length) == ("minilm", -1, "reviews", 16)
    assert (tiny.train.max_steps, tiny.train.batch_size, tiny.train.eval_every_steps) == (6, 8, 2)
    assert (tiny.checkpoint.every_steps, tiny.checkpoint.keep, tiny.optim.learning_rate) == (2, 10, 1e-3)

    minilm = loaded["minilm_sentiment"]
    assert minilm.freeze.rules == (
        FreezeRule("embeddings/.*", "freeze"),
        FreezeRule("encoder/layers/(0|1|2)/.*", "freeze"),
        FreezeRule(".*", "train"),
    )
    assert (minilm.train.max_steps, minilm.optim.learning_rate, minilm.data.max_length) == (120, 1e-4, 64)

    gpt2 = loaded["gpt2_clm"]
    assert (gpt2.model.source, gpt2.model.task, gpt2.data.dataset, gpt2.data.max_length) == (
        "gpt2",
        "causal-lm",
        "files",
        256,
    )
    assert [Path(f).name for f in gpt2.data.train_files] == ["train.jsonl"]
    assert all(Path(f).is_file() for f in gpt2.data.train_files + gpt2.data.eval_files)

    lora = loaded["llama_sft_lora"]
    assert (lora.lora.rank, lora.lora.alpha, lora.lora.dropout) == (16, 32.0, 0.05)
    assert [r.action for r in lora.freeze.rules] == ["train", "freeze"]
    assert (lora.model.frozen_dtype, lora.checkpoint.save_frozen, lora.optim.weight_decay) == ("bfloat16", False, 0.0)
    assert all(Path(f).is_file() for f in lora.data.train_files + lora.data.eval_files)


def test_shipped_config_takes_overrides():
    cfg = load_config(CONFIGS / "tiny.py", ["data.dataset=files", "data.train_files=x.jsonl", "train.max_steps=2"])
    assert (cfg.data.dataset, cfg.data.train_files, cfg.train.max_steps) == ("files", ("x.jsonl",), 2)


def test_scan_layers_of_runs_saved_as_a_switch_read_back():
    d = to_json(Config())
    for saved, now in ((True, "true"), (False, "false")):
        d["model"]["scan_layers"] = saved
        assert from_dict(d).model.scan_layers == now
    assert ModelConfig(scan_layers=False).scan_layers == "false"
