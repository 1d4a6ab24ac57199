"""Text generation from a causal LM with a kv cache: batched left-padded prompts, greedy or seeded sampling
(temperature, top-k, top-p), per-row EOS; `jaxft generate` of a run dir and the eval-time samples of training.

Owns the generation loop and prompt rendering for it; the cached attention math is the models' (decode_with_cache).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import models
from jaxft.config import from_dict
from jaxft.run_dir import read_run, restore_run

log = logging.getLogger("jaxft.generate")


class GenerateError(ValueError):
    """A user-caused generation problem (bad settings, a classifier run, a prompt that does not fit)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits: temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut


def check_settings(max_new_tokens: int, sampling: Sampling) -> None:
    if max_new_tokens <= 0:
        raise GenerateError(f"max_new_tokens: must be > 0, got {max_new_tokens}")
    if sampling.temperature < 0:
        raise GenerateError(f"temperature: must be >= 0, got {sampling.temperature}")
    if sampling.top_k < 0:
        raise GenerateError(f"top_k: must be >= 0, got {sampling.top_k}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise GenerateError(f"top_p: must be in (0, 1], got {sampling.top_p}")


# ---- the jitted math ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Picker:
    """The static part of Sampling (what changes the traced graph); temperature and top_p stay traced values,
    so another temperature or top_p reuses the compiled loop."""

    greedy: bool
    top_k: int
    nucleus: bool

    @staticmethod
    def of(sampling: Sampling) -> _Picker:
        return _Picker(sampling.temperature == 0.0, sampling.top_k, sampling.top_p < 1.0)


def sample_tokens(logits_BxV: jax.Array, key: jax.Array, picker: _Picker, temperature, top_p) -> jax.Array:
    """[B] int32 next tokens: argmax when greedy, else a draw from the tempered, top-k/top-p-cut softmax."""
    if picker.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if 0 < picker.top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, picker.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if picker.nucleus:
        # Keep the most likely tokens until their mass reaches top_p (the token that crosses it included).
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cut_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cut_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "picker"))
def _prefill(graphdef, params, ids_BxP, start_B, key, temperature, top_p, *, length: int, picker: _Picker):
    """The prompts through the model in one pass: (first new token [B], the filled cache of `length` slots)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(ids_BxP.shape[0], length)
    logits_Bx1xV, cache = model.decode_with_cache(ids_BxP, cache, 0, start_B, last_only=True)
    key = jax.random.fold_in(key, 0)
    return sample_tokens(logits_Bx1xV[:, 0], key, picker, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "picker"))
def _decode_loop(
    graphdef, params, first_B, cache, start_B, key, eos_E, temperature, top_p, *, max_new_tokens: int, picker: _Picker
):
    """Tokens 1..N-1, one cached step each, inside one while_loop that ends early once every row hit EOS.
    Returns [B, N] int32 with -1 after a row's EOS."""
    model = nnx.merge(graphdef, params)
    B, P = first_B.shape[0], cache["k"].shape[2] - (max_new_tokens - 1)
    tokens_BxN = jnp.full((B, max_new_tokens), -1, jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, eos_E)

    def cond(carry):
        i, _, _, done_B = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, tokens_BxN, cache, done_B = carry
        prev_Bx1 = jnp.maximum(jax.lax.dynamic_slice_in_dim(tokens_BxN, i - 1, 1, axis=1), 0)
        logits_Bx1xV, cache = model.decode_with_cache(prev_Bx1, cache, P + i - 1, start_B)
        sampled_B = sample_tokens(logits_Bx1xV[:, 0], jax.random.fold_in(key, i), picker, temperature, top_p)
        token_B = jnp.where(done_B, -1, sampled_B)
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, token_B[:, None], i, axis=1)
        return i + 1, tokens_BxN, cache, done_B | jnp.isin(token_B, eos_E)

    _, tokens_BxN, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens_BxN, cache, done_B))
    return tokens_BxN


# ---- the host side -----------------------------------------------------------------------------------------


def position_limit(spec: Any) -> int | None:
    """The longest sequence the model can position (GPT-2's learned table), or None (RoPE: no hard limit)."""
    return models.family_for_spec(spec).position_limit(spec)


def generate(
    model: nnx.Module | tuple[nnx.GraphDef, nnx.State],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    mesh: Any = None,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), up to max_new_tokens, stopping a row at its first EOS
    (not included). The prompts are left-padded into one batch; the same seed gives the same samples."""
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    check_settings(max_new_tokens, sampling)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerateError("prompts: every prompt needs at least one token")
    graphdef, params = nnx.split(model) if isinstance(model, nnx.Module) else model
    spec = nnx.merge(graphdef, params).spec
    longest = max(len(p) for p in prompts)
    limit = position_limit(spec)
    if limit is not None and longest + max_new_tokens > limit:
        raise GenerateError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's {limit} positions"
        )
    if limit is None and longest + max_new_tokens > spec.max_positions:
        log.warning(
            "prompt of %d tokens + %d new tokens exceeds the model's max_positions=%d",
            longest,
            max_new_tokens,
            spec.max_positions,
        )
    ids_BxP = np.zeros((len(prompts), longest), np.int32)
    start_B = np.asarray([longest - len(p) for p in prompts], np.int32)
    for b, p in enumerate(prompts):
        ids_BxP[b, start_B[b] :] = p
    eos_E = np.asarray(sorted(set(eos_ids)), np.int32)
    knobs = (np.float32(max(sampling.temperature, 1e-6)), np.float32(sampling.top_p))
    inputs = (ids_BxP, start_B, np.asarray(jax.random.key_data(jax.random.key(seed))), eos_E, knobs)
    if mesh is not None:  # replicated over the run's mesh (every process's devices), beside the parameters
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        inputs = jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: x[i]), inputs)
    ids, start, key_data, eos, knobs = inputs
    key = jax.random.wrap_key_data(key_data)
    picker, length = _Picker.of(sampling), longest + max_new_tokens - 1
    first_B, cache = _prefill(graphdef, params, ids, start, key, *knobs, length=length, picker=picker)
    tokens_BxN = _decode_loop(
        graphdef, params, first_B, cache, start, key, eos, *knobs, max_new_tokens=max_new_tokens, picker=picker
    )
    return [_until_eos(row, set(eos_ids)) for row in _to_host(tokens_BxN)]


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (with several processes, each must call it)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _until_eos(row: np.ndarray, eos: set[int]) -> list[int]:
    out = []
    for t in row.tolist():
        if t < 0 or t in eos:
            break
        out.append(t)
    return out


# ---- run dirs: prompts rendered as in training, EOS ids, text out ----------------------------------------


def prompt_kind(data_cfg: Any) -> str:
    """ "text" when the run trained on plain text (a prompt is continued as raw text), else "chat" (a prompt
    is a user turn followed by the generation prompt), read from the first record of its train files: for runs
    whose run.json predates its "prompt_kind"."""
    from jaxft.data import builders, lm

    for name in data_cfg.train_files:
        path = Path(name)
        if path.suffix.lower() == ".txt":
            return "text"
        try:
            for i, rec in builders.read_records(path):
                return lm.make_lm_record(f"{path}:{i}", rec, data_cfg)["kind"]
        except (OSError, builders.DataError):
            continue
    log.warning("cannot read the run's train files to tell chat from plain text; rendering prompts as chat turns")
    return "chat"


def text_prefix_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` tokenized as the start of a training document: the special tokens the tokenizer puts before the
    text (BOS, CLS) kept, those after it (EOS, SEP) dropped, since the document goes on."""
    full = list(tokenizer(text)["input_ids"])
    bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for lead in range(len(full) - len(bare) + 1):
        if full[lead : lead + len(bare)] == bare:
            return full[: lead + len(bare)]
    return full


def encode_prompts(encoder: Any, prompts: Sequence[str], kind: str) -> list[list[int]]:
    """Token ids of each prompt the way training rendered prompts (an LMEncoder's tokenizer and chat template)."""
    if kind == "chat":
        return [encoder.render_prompt(p) for p in prompts]
    return [text_prefix_ids(encoder.tokenizer, p) for p in prompts]


def read_eos_ids(hf_config: dict[str, Any], folder: Path, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: config.json's and generation_config.json's eos_token_id (an int or a
    list) and the tokenizer's eos token."""
    ids: set[int] = set()
    sources = [hf_config]
    try:
        sources.append(json.loads((Path(folder) / "generation_config.json").read_text()))
    except (OSError, ValueError):
        pass
    for source in sources:
        value = source.get("eos_token_id") if isinstance(source, dict) else None
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def generate_run(
    run_dir: Path,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int | None = None,
) -> list[str]:
    """Completions of each prompt by a causal-lm run's checkpoint (the latest, or `step`), as text."""
    from jaxft.data import lm

    check_settings(max_new_tokens, Sampling(temperature, top_k, top_p))
    if not prompts:
        raise GenerateError("no prompts: give at least one --prompt")
    meta = read_run(Path(run_dir))  # fail on a wrong run dir before loading anything
    task = meta["config"].get("model", {}).get("task")
    if task != "causal-lm":
        raise GenerateError(f"{run_dir}: generate needs a causal-lm run; this run is a {task} classifier")
    run = restore_run(Path(run_dir), step)
    meta = run.meta
    cfg = from_dict(meta["config"])
    folder = Path(meta["source"]["path"])
    encoder = lm.LMEncoder(folder, cfg.data, int(meta["spec"]["vocab_size"]))
    ids = encode_prompts(encoder, prompts, meta.get("prompt_kind") or prompt_kind(cfg.data))
    eos = read_eos_ids(meta.get("hf_config") or {}, folder, encoder.tokenizer)
    new = generate((run.graphdef, run.params), ids, max_new_tokens, temperature, top_k, top_p, seed, eos, mesh=run.mesh)
    return [encoder.tokenizer.decode(t, skip_special_tokens=True) for t in new]


def with_samples(
    evaluate: Callable[[Any], dict[str, float]],
    *,
    cfg: Any,
    skeleton: Any,
    graphdef: nnx.GraphDef,
    encoder: Any,
    prompt_kind: str,
    run_dir: Path,
    mesh: Any,
) -> Callable[[Any], dict[str, float]]:
    """`evaluate(state)` that, for a causal-lm run with data.sample_prompts, also greedily completes each prompt
    and appends {"step", "prompt", "completion"} lines to RUN_DIR/samples.jsonl (process 0 writes). `skeleton`
    (a setup.ModelSkeleton) says where the tokenizer and generation config are; prompts render as `prompt_kind`."""
    prompts = tuple(cfg.data.sample_prompts)
    if not prompts or cfg.model.task != "causal-lm":
        return evaluate
    ids = encode_prompts(encoder, prompts, prompt_kind)
    eos = read_eos_ids(skeleton.hf_config, skeleton.folder, encoder.tokenizer)
    new_tokens = cfg.train.sample_max_new_tokens
    limit = position_limit(skeleton.spec)
    if limit is not None and max(map(len, ids)) + new_tokens > limit:  # refused now, not at the first eval
        raise GenerateError(
            f"data.sample_prompts: a prompt of {max(map(len, ids))} tokens + train.sample_max_new_tokens="
            f"{new_tokens} exceeds the model's {limit} positions"
        )
    path = Path(run_dir) / "samples.jsonl"

    def evaluate_and_sample(state: Any) -> dict[str, float]:
        metrics = evaluate(state)
        params = nnx.merge_state(state.trainable, state.frozen)
        completions = generate((graphdef, params), ids, new_tokens, eos_ids=eos, mesh=mesh)
        step = int(_to_host(state.step))
        lines = []
        for prompt, tokens in zip(prompts, completions):
            text = encoder.tokenizer.decode(tokens, skip_special_tokens=True)
            log.info("sample at step %d: %r -> %r", step, prompt, text)
            lines.append(json.dumps({"step": step, "prompt": prompt, "completion": text}) + "\n")
        if jax.process_index() == 0:
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(lines)
        return metrics

    return evaluate_and_sample
