"""Decoder-LLM data: prompt/completion, chat and plain-text files as a tfds builder; chat rendering with loss
masks over assistant turns; grain pipelines that pack examples into rows with per-segment positions.

Owns turning text into token rows; it must not touch jax arrays or the mesh (mesh.make_global_batch does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import grain.experimental as grain_exp
import numpy as np
import tensorflow_datasets as tfds

from jaxft.config import DataConfig
from jaxft.data import builders, pipeline, selected_rows
from jaxft.data.buckets import bucket_for, grouped_batches, sorted_batches
from jaxft.data.builders import DataError
from jaxft.data.pipeline import as_text  # tfds hands text back as bytes

ROLES = ("system", "user", "assistant")
# Bumped when the stored record layout changes, so prepared copies of the old layout are not reused.
RECORD_LAYOUT = "lm-v1"

# For tokenizers without a chat template: role tags, and every assistant turn closed by the eos token so the
# model learns to stop. Prefixes of a conversation render as prefixes of it (assistant spans rely on that).
BUILTIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ---- records ---------------------------------------------------------------------------------------------


def read_text_documents(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line number, {"text": document}) from a .txt file whose documents are separated by blank lines."""
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    lines: list[str] = []
    start = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                start = start or i
                lines.append(line.rstrip("\n"))
            elif lines:
                yield start, {"text": "\n".join(lines)}
                lines, start = [], 0
    if lines:
        yield start, {"text": "\n".join(lines)}


def _read_lm_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".txt":
        return read_text_documents(path)
    return builders.read_records(path)


def make_lm_record(where: str, rec: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """One uniform stored record (kind, roles, contents, text, source) from a raw line, or a DataError."""
    record = {"kind": "chat", "roles": [], "contents": [], "text": "", "source": where}
    if cfg.messages_column in rec:
        messages = rec[cfg.messages_column]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: column {cfg.messages_column!r} must be a list of {{role, content}} objects")
        for j, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise DataError(f"{where}: message {j} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {j} ({m['role']}) content must be a string")
        record["roles"] = [m["role"] for m in messages]
        record["contents"] = [m["content"] for m in messages]
    elif cfg.prompt_column in rec and cfg.completion_column in rec:
        prompt, completion = rec[cfg.prompt_column], rec[cfg.completion_column]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: columns {cfg.prompt_column!r} and {cfg.completion_column!r} must be strings")
        record["roles"], record["contents"] = ["user", "assistant"], [prompt, completion]
    elif cfg.text_column in rec:
        if not isinstance(rec[cfg.text_column], str):
            raise DataError(f"{where}: column {cfg.text_column!r} must be a string")
        record["kind"], record["text"] = "text", rec[cfg.text_column]
    else:
        raise DataError(
            f"{where}: not a known record kind: expected {cfg.messages_column!r}, {cfg.prompt_column!r} + "
            f"{cfg.completion_column!r}, or {cfg.text_column!r}; found columns {sorted(rec)}"
        )
    if record["kind"] == "chat" and "assistant" not in record["roles"]:
        raise DataError(f"{where}: chat has no assistant turn, so it has nothing to train on")
    return record


class LMFilesConfig(builders.FilesConfig):
    """FilesConfig's content-hash name over the files; the label slot salts it with the LM columns instead."""

    def __init__(self, *, splits: dict[str, list[Path]], data: DataConfig):
        columns = (RECORD_LAYOUT, data.prompt_column, data.completion_column, data.messages_column)
        super().__init__(splits=splits, data=data, labels=columns, token_level=False)


class JaxftLMFiles(tfds.core.GeneratorBasedBuilder):
    """Prompt/completion, chat and plain-text records from your own JSONL/CSV/.txt files, in one uniform layout."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list = []

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="User-provided language-model files.",
            features=tfds.features.FeaturesDict(
                {
                    "kind": text,
                    "roles": tfds.features.Sequence(text),
                    "contents": tfds.features.Sequence(text),
                    "text": text,
                    "source": text,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(files) for split, files in self.builder_config.splits.items()}

    def _generate_examples(self, files):
        count = 0
        for k, f in enumerate(files):
            for i, rec in _read_lm_records(Path(f)):
                count += 1
                yield f"{k}:{i}", make_lm_record(f"{f}:{i}", rec, self.builder_config.data)
        if count == 0:
            raise DataError(f"{', '.join(str(f) for f in files)}: dataset is empty")


@dataclasses.dataclass
class LMSources:
    train: Any  # random-access tfds data source (len, __getitem__) of uniform records
    eval: Any | None


def open_lm_sources(cfg: DataConfig, need_eval: bool = True) -> LMSources:
    """Prepares (once per file content) and opens the train and eval files as tfds array_record data sources;
    or opens a registered, prepared tfds dataset (data.dataset) whose records are read through the same columns."""
    if cfg.dataset != "files":
        return open_registered_lm_sources(cfg, need_eval)
    if not cfg.train_files:
        raise DataError("data.train_files: required for causal-lm fine-tuning")
    splits = {cfg.train_split: [Path(f) for f in cfg.train_files]}
    if need_eval and cfg.eval_files:
        splits[cfg.eval_split] = [Path(f) for f in cfg.eval_files]
    builder = JaxftLMFiles(
        config=LMFilesConfig(splits=splits, data=cfg),
        data_dir=cfg.data_dir or pipeline.default_data_dir(),
        file_format="array_record",
    )
    builders.prepare(builder, download_config=tfds.download.DownloadConfig(verify_ssl=False))
    sources = builder.as_data_source()
    return LMSources(sources[cfg.train_split], sources[cfg.eval_split] if cfg.eval_split in splits else None)


class RegisteredRecords:
    """A registered tfds dataset's split seen as uniform LM records (make_lm_record), converted on read."""

    def __init__(self, source: Any, cfg: DataConfig, name: str):
        self.source, self.cfg, self.name = source, cfg, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.source):
            raise IndexError(f"{self.name}: record {index} out of range")
        return make_lm_record(f"{self.name}[{index}]", self._plain(self.source[index]), self.cfg)

    def _plain(self, rec: dict[str, Any]) -> dict[str, Any]:
        out = {k: _python(v) for k, v in rec.items()}
        messages = out.get(self.cfg.messages_column)
        if isinstance(messages, dict):  # a tfds Sequence of {role, content} comes back as lists per field
            fields = list(messages)
            out[self.cfg.messages_column] = [dict(zip(fields, row)) for row in zip(*messages.values())]
        return out


def _python(x: Any) -> Any:
    """tfds values (bytes, numpy arrays, nested dicts) as plain Python strings, lists and dicts."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {k: _python(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_python(v) for v in x.tolist()] if x.ndim else _python(x.item())
    if isinstance(x, list):
        return [_python(v) for v in x]
    return x


def open_registered_lm_sources(cfg: DataConfig, need_eval: bool) -> LMSources:
    builder = pipeline.registered_builder(cfg)
    splits = builder.info.splits
    wanted = [cfg.train_split] + ([cfg.eval_split] if need_eval and cfg.eval_split in splits else [])
    for split in wanted:
        if split not in splits:
            raise DataError(f"data.train_split: split {split!r} not in {cfg.dataset} (has {list(splits)})")
        if splits[split].num_examples == 0:
            raise DataError(f"{cfg.dataset}/{split}: dataset is empty")
    sources = builder.as_data_source()
    views = {split: RegisteredRecords(sources[split], cfg, f"{cfg.dataset}/{split}") for split in wanted}
    for view in views.values():
        view[0]  # wrong columns fail here, in one line, rather than mid-run
    return LMSources(views[cfg.train_split], views.get(cfg.eval_split) if len(wanted) > 1 else None)


# ---- tokenization ----------------------------------------------------------------------------------------


class LMEncoder:
    """Renders and tokenizes records with the checkpoint's tokenizer into input_ids and a loss mask.

    loss_mask[t] = 1 marks token t as a target (predicted from the tokens before it). The first token of every
    example is never a target: nothing before it in its segment predicts it, so packed rows are safe as they are.
    """

    def __init__(self, tokenizer_dir: Path, cfg: DataConfig, vocab_size: int):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError) as e:
            raise DataError(f"{tokenizer_dir}: cannot load the checkpoint's tokenizer ({e})") from None
        if len(self.tokenizer) > vocab_size:
            raise DataError(
                f"{tokenizer_dir}: tokenizer has {len(self.tokenizer)} tokens but the checkpoint's embedding has "
                f"{vocab_size} rows"
            )
        if not self.tokenizer.is_fast:
            raise DataError(f"{tokenizer_dir}: a fast tokenizer (tokenizer.json) is needed to find assistant turns")
        # An explicit data.chat_template wins; "" means the tokenizer's own (None here: it may be a dict of named
        # templates that only the tokenizer resolves), else the built-in one. Export saves a non-None one.
        own = self.tokenizer.chat_template
        self.chat_template: str | None = cfg.chat_template or (None if own else BUILTIN_CHAT_TEMPLATE)
        self.max_length = cfg.max_length
        self.truncation = cfg.truncation
        self.train_on_prompt = cfg.train_on_prompt
        self.dropped = 0

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool, where: str = "") -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # a user's Jinja template can fail in any way; name it
            raise DataError(f"{where or 'chat'}: the chat template failed ({type(e).__name__}: {e})") from None

    def render_prompt(self, prompt: str) -> list[int]:
        """Token ids of a user prompt exactly as prompts looked in training, ready for the assistant's reply."""
        text = self.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """{"input_ids": int32 [n], "loss_mask": float32 [n]}; None when truncation="drop" dropped it.

        Chat examples have n <= max_length. A plain-text document comes back whole; encode_rows splits it.
        """
        where = as_text(record.get("source", "example"))
        if as_text(record["kind"]) == "text":
            ids = self._encode_text(as_text(record["text"]))
            return _example(ids, np.ones(len(ids), np.float32))
        messages = [{"role": as_text(r), "content": as_text(c)} for r, c in zip(record["roles"], record["contents"])]
        ids, mask = self._encode_chat(messages, where)
        if len(ids) > self.max_length:
            if self.truncation == "drop":
                self.dropped += 1
                return None
            if self.truncation != "left":
                raise DataError(
                    f"{where}: example has {len(ids)} tokens, more than data.max_length={self.max_length} "
                    "(set data.truncation to 'left' or 'drop')"
                )
            ids, mask = ids[-self.max_length :], mask[-self.max_length :]  # the start of the prompt goes
        return _example(ids, mask)

    def encode_rows(self, record: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        """encode() split into rows of at most max_length tokens ([] when dropped): what the pipelines read."""
        example = self.encode(record)
        if example is None:
            return []
        n, step = len(example["input_ids"]), self.max_length
        return [
            _example(example["input_ids"][i : i + step], example["loss_mask"][i : i + step]) for i in range(0, n, step)
        ]

    def _encode_text(self, text: str) -> np.ndarray:
        ids = list(self.tokenizer(text)["input_ids"])  # the tokenizer's normal special tokens
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return np.asarray(ids, np.int32)

    def _encode_chat(self, messages: list[dict[str, str]], where: str) -> tuple[np.ndarray, np.ndarray]:
        text = self.render_chat(messages, False, where)
        # The template adds its own BOS and turn markers: no special tokens again.
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        if self.train_on_prompt:
            return ids, np.ones(len(ids), np.float32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64).reshape(-1)
        mask = np.zeros(len(ids), np.float32)
        for lo, hi in self._assistant_spans(messages, text, where):
            mask[(starts >= lo) & (starts < hi)] = 1.0
        return ids, mask

    def _assistant_spans(self, messages: list[dict[str, str]], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn (its content and the template's turn close) in `text`."""
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_chat(messages[:k], True, where)
            upto = self.render_chat(messages[: k + 1], False, where)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError(
                    f"{where}: the chat template does not render prefixes of a conversation as prefixes of it, "
                    "so assistant turns cannot be located (set data.train_on_prompt=true or another template)"
                )
            spans.append((len(before), len(upto)))
        return spans


def _example(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    mask = mask.copy()
    mask[:1] = 0.0  # nothing in its segment precedes the first token
    return {"input_ids": ids.astype(np.int32), "loss_mask": mask.astype(np.float32)}


# ---- grain pipelines -------------------------------------------------------------------------------------


class _EncodeRows(grain_exp.FlatMapTransform):
    """Records → token rows; drops vanish. Fails instead of spinning forever when every record is dropped."""

    def __init__(self, encoder: LMEncoder, num_records: int):
        self.encoder, self.num_records, self.max_fan_out = encoder, num_records, 1 << 16
        self._empty_in_a_row = 0

    def flat_map(self, record):
        rows = self.encoder.encode_rows(record)
        self._empty_in_a_row = 0 if rows else self._empty_in_a_row + 1
        if self._empty_in_a_row > self.num_records:
            raise DataError(f"every training example is longer than data.max_length={self.encoder.max_length}")
        return rows


def pad_row(example: dict[str, np.ndarray], max_length: int) -> dict[str, np.ndarray]:
    """One example right-padded to max_length: segment_ids 1 on real tokens, positions 0.., zeros after."""
    n = len(example["input_ids"])
    row = {k: np.zeros(max_length, np.int32) for k in ("input_ids", "segment_ids", "positions")}
    row["loss_mask"] = np.zeros(max_length, np.float32)
    row["input_ids"][:n], row["loss_mask"][:n] = example["input_ids"], example["loss_mask"]
    row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
    return row


def _from_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": row["input_ids"].astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
        "segment_ids": row["input_ids_segment_ids"].astype(np.int32),
        "positions": row["input_ids_positions"].astype(np.int32),
    }


def build_lm_train_dataset(
    source: Any,
    encoder: LMEncoder,
    rows: Any,
    seed: int,
    max_length: int,
    packing: bool,
    buckets: tuple[int, ...] = (),
) -> grain.IterDataset | grain.MapDataset:
    """Infinite, seeded, reshuffled every epoch; rows packed or padded; element s is global batch s
    (`rows.size` rows, a mesh.BatchRows) of which this process keeps its rows (`rows.mine`).

    Every process reads, tokenizes and packs the whole global batch, so the batches and the iterator state do
    not depend on the process count. Packing is first-fit (an example is never split across rows). Unpacked
    with `buckets`, rows are grouped by length and each batch is padded to its bucket. iter() of the result is
    checkpointable.
    """
    if max_length < encoder.max_length:
        raise DataError(f"max_length={max_length} is shorter than the encoder's data.max_length={encoder.max_length}")
    size, mine = selected_rows(rows)
    if buckets and not packing:
        return _bucketed_rows(source, encoder, size, mine, seed, buckets)
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).to_iter_dataset()
    examples = grain_exp.FlatMapIterDataset(ds, _EncodeRows(encoder, len(source)))
    if packing:
        lengths = {"input_ids": max_length, "loss_mask": max_length}
        examples = grain_exp.FirstFitPackIterDataset(
            examples, length_struct=lengths, num_packing_bins=size, shuffle_bins=False
        ).map(_from_packed)
    else:
        examples = examples.map(lambda example: pad_row(example, max_length))
    return examples.batch(size, drop_remainder=True).map(lambda batch: {k: v[mine] for k, v in batch.items()})


def row_table(source: Any, encoder: LMEncoder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token row of the data (an example longer than max_length splits into several, a dropped one has
    none): (its example, its part, its length). One tokenizing pass, for bucketing."""
    example, part, length = [], [], []
    for i in range(len(source)):
        for j, row in enumerate(encoder.encode_rows(source[i])):
            example.append(i)
            part.append(j)
            length.append(len(row["input_ids"]))
    if not length:
        raise DataError(f"every training example is longer than data.max_length={encoder.max_length}")
    return np.asarray(example, np.int64), np.asarray(part, np.int64), np.asarray(length, np.int64)


def _bucketed_rows(source, encoder: LMEncoder, size: int, mine: list[int], seed: int, buckets) -> grain.MapDataset:
    example, part, lengths = row_table(source, encoder)
    if len(lengths) < size:
        raise DataError(f"train.batch_size: {size} is larger than the {len(lengths)} training rows")
    rows_of = functools.lru_cache(maxsize=256)(lambda i: encoder.encode_rows(source[i]))

    def encode(index: np.ndarray) -> dict[str, np.ndarray]:
        length = bucket_for(int(lengths[index].max()), buckets)
        picked = [pad_row(rows_of(int(example[r]))[int(part[r])], length) for r in index[mine]]
        return {k: np.stack([row[k] for row in picked]) for k in picked[0]}

    return grouped_batches(lengths, size, seed, buckets).map(encode)


def iter_lm_eval_batches(
    source: Any, encoder: LMEncoder, rows: Any, max_length: int, buckets: tuple[int, ...] = ()
) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example exactly once, one per row, `rows.size` per global batch, this process's rows of each;
    rows past the end are all-zero. In order, padded to max_length; with `buckets`, shortest first, each batch
    padded to its bucket (the order does not change an eval's sums).

    Every process encodes the whole (small) eval set, so all agree on the batch count without a collective and
    stay in lockstep (as pipeline.iter_eval_batches does).
    """
    encoded = [r for i in range(len(source)) for r in encoder.encode_rows(source[i])]
    size, mine = selected_rows(rows)
    if buckets:
        batches = sorted_batches(np.asarray([len(r["input_ids"]) for r in encoded], np.int64), size)
    else:
        batches = [np.arange(b * size, min((b + 1) * size, len(encoded))) for b in range(-(-len(encoded) // size))]
    empty = {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32)}
    for index in batches:
        length = bucket_for(max(len(encoded[i]["input_ids"]) for i in index), buckets) if buckets else max_length
        picked = [pad_row(encoded[int(index[r])] if r < len(index) else empty, length) for r in mine]
        yield {k: np.stack([row[k] for row in picked]) for k in picked[0]}
