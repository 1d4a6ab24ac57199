"""A real tokenizer end to end: Mistral 7B's own sentencepiece model (shipped in mistral-common's package data)
on a tiny random Mistral-shaped checkpoint with its 32000-token vocabulary. SFT examples round-trip through the
tokenizer to exactly the rendered text, the loss mask covers exactly the completion, and a checkpoint whose
embedding disagrees with the tokenizer is refused in one line."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import MistralConfig

from jaxft import cli
from jaxft.config import DataConfig
from jaxft.data.lm import LMEncoder
from tests.fixtures import LLAMA_TINY, SFT, save_tiny_llama

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}
PROMPT = "Translate to French:  naïve café, 1234 items\n(second line)"
COMPLETION = "Un café naïf, 1234 articles — d'accord?"


def sentencepiece_model() -> Path:
    path = Path(sys.prefix) / "mistral-tokenizer.model.v1"  # make test takes it from mistral-common's wheel
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make test` extracts it from the mistral-common 1.13.1 wheel")
    return path


def mistral_folder(folder: Path, vocab_size: int = 32000) -> Path:
    config = MistralConfig(**{**LLAMA_TINY, "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2})
    save_tiny_llama(folder, config)
    shutil.copyfile(sentencepiece_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    return mistral_folder(tmp_path_factory.mktemp("real_tok") / "mistral")


def test_sft_example_round_trips_through_the_real_tokenizer(mistral):
    encoder = LMEncoder(mistral, DataConfig(max_length=256), vocab_size=32000)
    tok = encoder.tokenizer
    assert len(tok) == 32000 and tok.is_fast
    assert tok("Hello")["input_ids"] == [1, 22557]  # Mistral 7B's ids: <s>, "▁Hello"
    record = {"kind": "chat", "roles": ["user", "assistant"], "contents": [PROMPT, COMPLETION]}
    example = encoder.encode(record)
    ids, mask = example["input_ids"], example["loss_mask"]
    text = encoder.render_chat(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": COMPLETION}], False
    )
    assert text.startswith("<s>") and text.endswith(COMPLETION + "</s>")
    assert tok.decode(ids.tolist()) == text  # every character back, specials included
    target = tok.decode(ids[mask > 0].tolist())
    assert target.strip() == COMPLETION + "</s>", target  # the reply and its eos, nothing of the prompt
    prompt_ids = encoder.render_prompt(PROMPT)
    assert ids[: len(prompt_ids)].tolist() == prompt_ids and not mask[: len(prompt_ids)].any()


def test_plain_text_round_trips_with_bos_and_eos(mistral):
    encoder = LMEncoder(mistral, DataConfig(max_length=64), vocab_size=32000)
    doc = "Line one.\n\n  Indented line two, with ünïcödé and 3.14159."
    ids = encoder.encode({"kind": "text", "text": doc})["input_ids"].tolist()
    assert ids[0] == encoder.tokenizer.bos_token_id and ids[-1] == encoder.tokenizer.eos_token_id
    assert encoder.tokenizer.decode(ids, skip_special_tokens=True) == doc
    rows = encoder.encode_rows({"kind": "text", "text": doc * 20})
    assert [len(r["input_ids"]) for r in rows[:-1]] == [64] * (len(rows) - 1)
    joined = np.concatenate([r["input_ids"] for r in rows]).tolist()
    assert encoder.tokenizer.decode(joined, skip_special_tokens=True) == doc * 20


def test_embedding_smaller_than_the_real_vocab_is_one_line(tmp_path, capsys, data_dir):
    folder = mistral_folder(tmp_path / "small", vocab_size=31000)
    capsys.readouterr()  # transformers' save progress bar
    run_dir = tmp_path / "run"
    assert cli.main(["train", SFT, "--run-dir", str(run_dir), f"model.source={folder}", "lora.rank=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer has 32000 tokens" in err[0] and "31000 rows" in err[0], err
