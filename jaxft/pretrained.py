"""From a checkpoint name to a sharded NNX model: resolve, read the HF config, shape, shard, load.

Shared by `jaxft.load` (the Python API) and `train` so both load weights the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxft import load as load_io
from jaxft import models, sharding
from jaxft.config import LoadConfig, LoraConfig, MeshConfig, ModelConfig
from jaxft.mesh import build_mesh
from jaxft.models import lora as lora_lib
from jaxft.paths import path_str

log = logging.getLogger("jaxft.pretrained")


@dataclasses.dataclass
class Pretrained:
    folder: Path
    hf_config: dict[str, Any]
    spec: Any  # the family's spec (models.BertSpec, models.LlamaSpec)
    graphdef: nnx.GraphDef
    params: nnx.State  # sharded arrays
    param_shardings: dict[str, jax.sharding.NamedSharding]
    source: dict[str, Any]  # path and file hashes
    lora: lora_lib.LoraSpec | None = None  # adapters on the targeted layers (not in the checkpoint)

    @property
    def family(self) -> models.Family:
        return models.family_for_spec(self.spec)

    def model(self, compute_dtype: Any = jnp.float32) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params).configure(compute_dtype)


def read_spec(model_cfg: ModelConfig, num_labels: int) -> tuple[Path, dict[str, Any], Any]:
    folder = load_io.resolve_source(model_cfg.source)
    hf = load_io.read_hf_config(folder)
    family = models.family_of(hf, model_cfg.task)
    if num_labels <= 0:
        num_labels = model_cfg.num_labels or hf.get("num_labels") or len(hf.get("id2label", {})) or 2
    spec = family.read_spec(hf, model_cfg.task, num_labels, model_cfg.dropout_rate, model_cfg.scan_layers)
    return folder, hf, spec


def infer_shardings(abstract_params: nnx.State, mesh: Mesh, rules) -> dict[str, jax.sharding.NamedSharding]:
    return sharding.named(sharding.infer_param_specs(abstract_params, rules, mesh), mesh)


def lora_spec(cfg: LoraConfig | None) -> lora_lib.LoraSpec | None:
    if cfg is None or cfg.rank == 0:
        return None
    return lora_lib.LoraSpec(cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))


def build_abstract(
    model_cfg: ModelConfig, mesh: Mesh, rules, num_labels: int = 0, lora_cfg: LoraConfig | None = None
) -> Pretrained:
    """Shapes, shardings and source identity, with no weights read: `params` holds abstract arrays.
    A resume restores into these shardings straight from the checkpoint."""
    folder, hf, spec = read_spec(model_cfg, num_labels)
    adapters = lora_spec(lora_cfg)
    graphdef, abstract_params = models.build_abstract_model(spec, model_cfg.param_dtype, adapters)
    shardings = infer_shardings(abstract_params, mesh, rules)
    source = load_io.source_identity(folder, load_io.open_checkpoint(folder))
    return Pretrained(folder, hf, spec, graphdef, abstract_params, shardings, source, adapters)


def cast_abstract(abstract_params: nnx.State, dtype: Any, which: set[str]) -> nnx.State:
    """The abstract parameters with those in `which` stored in `dtype` (frozen weights kept in bf16)."""
    flat = {
        p: v.replace(jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype))) if path_str(p) in which else v
        for p, v in abstract_params.flat_state()
    }
    return nnx.from_flat_state(flat)


def with_param_dtypes(pre: Pretrained, dtype: Any, which: set[str]) -> Pretrained:
    return dataclasses.replace(pre, params=cast_abstract(pre.params, dtype, which))


def load_weights(pre: Pretrained, model_cfg: ModelConfig, load_cfg: LoadConfig, seed: int = 0) -> Pretrained:
    """The checkpoint's tensors merged into `pre`'s abstract parameters, each placed in its sharding."""
    family = pre.family
    new_params = load_cfg.new_params + ((lora_lib.ADAPTER_PARAMS,) if pre.lora else ())
    source = load_io.open_checkpoint(pre.folder)
    prefix = family.key_prefix(pre.spec, pre.hf_config, set(source.shapes))
    params, identity = load_io.load_pretrained(
        pre.folder,
        pre.params,
        lambda path: family.hf_entry(path, pre.spec, prefix),
        pre.param_shardings,
        new_params,
        load_cfg.ignore_unused + family.ignorable_keys(pre.spec),
        lambda wanted: models.init_params(pre.spec, model_cfg.param_dtype, wanted, pre.param_shardings, seed, pre.lora),
        source,
    )
    return dataclasses.replace(pre, params=params, source=identity)


def load_frozen(
    pre: Pretrained, model_cfg: ModelConfig, load_cfg: LoadConfig, abstract_frozen: nnx.State, recorded: dict[str, Any]
) -> nnx.State:
    """The frozen parameters of a checkpoint saved without them (checkpoint.save_frozen=false), read again from
    the pretrained files it recorded (`recorded`: path and sha256 per file), which must be unchanged."""
    folder = Path(recorded.get("path", ""))
    if not (folder / "config.json").is_file():
        raise load_io.CheckpointError(
            f"{folder}: the pretrained model this checkpoint's frozen weights come from is gone "
            "(checkpoint.save_frozen=false keeps only the trained parameters)"
        )
    subset = dataclasses.replace(pre, folder=folder, params=abstract_frozen)
    # The trained parameters' tensors are in the files too; only the frozen ones are read.
    loaded = load_weights(subset, model_cfg, dataclasses.replace(load_cfg, ignore_unused=(r".*",)))
    want, have = recorded.get("files") or {}, loaded.source.get("files") or {}
    if want and have and want != have:
        changed = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        raise load_io.CheckpointError(
            f"{folder}: pretrained files changed since this checkpoint was saved ({', '.join(changed)} differ "
            "from the recorded sha256), and its frozen weights were not saved with it"
        )
    if not (want and have):
        log.warning("%s: cannot verify the pretrained files against the checkpoint (no sha256 recorded)", folder)
    return loaded.params


def check_frozen_reloadable(frozen_paths: set[str], load_cfg: LoadConfig, save_frozen: bool) -> None:
    """checkpoint.save_frozen=false trusts the pretrained files for every frozen parameter: none may be one that
    a load can initialise fresh instead (load.new_params), or a restore could not give it back."""
    from jaxft.config import ConfigError
    from jaxft.paths import matches_any

    fresh = sorted(p for p in frozen_paths if matches_any(p, load_cfg.new_params))
    if not save_frozen and fresh:
        raise ConfigError(
            f"checkpoint.save_frozen=false: frozen parameter {fresh[0]} is on load.new_params, so it may not come "
            "from the pretrained files; train it or save frozen parameters"
        )


def load_pretrained(
    model_cfg: ModelConfig,
    load_cfg: LoadConfig,
    mesh: Mesh,
    rules,
    num_labels: int = 0,
    seed: int = 0,
    lora_cfg: LoraConfig | None = None,
) -> Pretrained:
    folder, hf, spec = read_spec(model_cfg, num_labels)
    adapters = lora_spec(lora_cfg)
    graphdef, abstract_params = models.build_abstract_model(spec, model_cfg.param_dtype, adapters)
    shardings = infer_shardings(abstract_params, mesh, rules)
    pre = Pretrained(folder, hf, spec, graphdef, abstract_params, shardings, {}, adapters)
    return load_weights(pre, model_cfg, load_cfg, seed)


def load(
    path_or_hub_id: str,
    task: str = "sequence-classification",
    num_labels: int = 0,
    dtype: Any = "float32",
    mesh: Mesh | None = None,
    new_params: tuple[str, ...] | None = None,
    scan_layers: bool = True,
) -> nnx.Module:
    """The NNX model with pretrained weights. Encoders: `model(input_ids=..., attention_mask=...,
    token_type_ids=...)` gives logits [B, C] (or [B, L, C]); decoders (task="causal-lm"):
    `model(input_ids=...)` gives logits [B, L, V].

    dtype is the compute dtype (parameters stay fp32). With no mesh, parameters are replicated over all
    local devices' data axis. A missing head is initialised fresh and logged.
    """
    mesh = mesh if mesh is not None else build_mesh(MeshConfig())
    model_cfg = ModelConfig(source=path_or_hub_id, task=task, num_labels=num_labels, scan_layers=scan_layers)
    load_cfg = LoadConfig() if new_params is None else LoadConfig(new_params=new_params)
    pre = load_pretrained(model_cfg, load_cfg, mesh, MeshConfig().rules, num_labels)
    return pre.model(jnp.dtype(dtype))
