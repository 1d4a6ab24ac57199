"""Registered tfds datasets for causal-LM fine-tuning: prompt/completion and chat (a Sequence of messages)
records come through data.*_column exactly as the same rows from JSONL do, train end to end, and wrong columns
or an unprepared dataset fail in one line."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxft import cli
from jaxft.config import DataConfig
from jaxft.data import lm
from jaxft.data.builders import DataError
from tests.fixtures import SFT, metrics_records, save_tiny_chat_model

QA = [("what is the capital of france ?", f"paris {'one two three'.split()[i % 3]}") for i in range(12)]


class JaxftTestQa(tfds.core.GeneratorBasedBuilder):
    """question/answer pairs, as a registered dataset would hold them."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"question": tfds.features.Text(), "answer": tfds.features.Text()})
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(QA), "validation": self._generate_examples(QA[:4])}

    def _generate_examples(self, rows):
        for i, (q, a) in enumerate(rows):
            yield i, {"question": q, "answer": a}


class JaxftTestChat(tfds.core.GeneratorBasedBuilder):
    """Conversations as a Sequence of {role, content}."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        message = {"role": tfds.features.Text(), "content": tfds.features.Text()}
        features = tfds.features.FeaturesDict({"conversation": tfds.features.Sequence(message)})
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (q, a) in enumerate(QA):
            turns = [("system", "you are helpful"), ("user", q), ("assistant", a)]
            yield i, {"conversation": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("registered")
    for builder in (JaxftTestQa, JaxftTestChat):
        builder(data_dir=str(d), file_format="array_record").download_and_prepare()
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("lm_tfds") / "qwen2")


def test_registered_records_encode_as_the_same_rows_from_jsonl(tfds_dir, model, tmp_path, data_dir):
    registered = DataConfig(
        dataset="jaxft_test_qa",
        data_dir=str(tfds_dir),
        prompt_column="question",
        completion_column="answer",
        eval_split="validation",
    )
    sources = lm.open_lm_sources(registered)
    assert len(sources.train) == 12 and len(sources.eval) == 4
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    files = lm.open_lm_sources(DataConfig(dataset="files", train_files=(str(jsonl),), data_dir=str(data_dir)))
    encoder = lm.LMEncoder(model, registered, vocab_size=1000)
    mine = sorted((tuple(e["input_ids"]), tuple(e["loss_mask"])) for e in map(encoder.encode, sources.train))
    theirs = sorted((tuple(e["input_ids"]), tuple(e["loss_mask"])) for e in map(encoder.encode, files.train))
    assert mine == theirs

    chat = lm.open_lm_sources(
        DataConfig(dataset="jaxft_test_chat", data_dir=str(tfds_dir), messages_column="conversation")
    )
    first = chat.train[0]
    assert [lm.as_text(r) for r in first["roles"]] == ["system", "user", "assistant"] and chat.eval is None
    example = encoder.encode(first)
    reply = encoder.tokenizer(QA[0][1] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert example["input_ids"][example["loss_mask"] > 0].tolist() == reply


def test_sft_on_a_registered_dataset_end_to_end(tfds_dir, model, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"model.source={model}",
        "data.dataset=jaxft_test_chat",
        f"data.data_dir={tfds_dir}",
        "data.messages_column=conversation",
        "data.eval_split=train",
        "data.max_length=64",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.eval_batch_size=8",
        "train.eval_every_steps=2",
        "checkpoint.every_steps=2",
        "lora.rank=2",
    ]
    assert cli.main(["train", SFT, "--run-dir", str(run_dir), *args]) == 0
    final = metrics_records(run_dir)[-1]
    assert final["step"] == 2 and np.isfinite(final["eval_perplexity"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset="jaxft_test_qa"), "not a known record kind"),  # default prompt/completion columns
        (dict(dataset="jaxft_test_qa", prompt_column="question", completion_column="answer", train_split="x"), "'x'"),
        (dict(dataset="jaxft_test_nothing_here"), "not a known tfds dataset"),
    ],
)
def test_registered_dataset_problems_are_one_line_errors(tfds_dir, overrides, message):
    with pytest.raises(DataError, match=message) as e:
        lm.open_lm_sources(DataConfig(data_dir=str(tfds_dir), **overrides))
    assert "\n" not in str(e.value)


def test_an_unprepared_registered_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="not prepared in array_record format"):
        lm.open_lm_sources(DataConfig(dataset="jaxft_test_qa", data_dir=str(tmp_path)))
