"""Generation with a kv cache: cached greedy decoding equals re-running the full forward on the growing sequence
(Llama-family scanned and unscanned, GQA, qk-norm, sliding window; GPT-2), batched left-padded prompts equal
each prompt alone, greedy equals transformers' generate, seeded sampling is reproducible; `jaxft generate` on a
tiny trained run, the eval-time samples.jsonl, and its one-line errors."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, LlamaConfig

import jaxft
from jaxft import cli
from jaxft.generate import GenerateError, generate
from jaxft.models.gpt2 import GPT2Model, GPT2Spec
from jaxft.models.llama import LlamaModel, LlamaSpec, RopeSpec
from tests.fixtures import CHATML, reference_greedy, save_tiny_gpt2, save_tiny_llama, save_tokenizer

V = 128
SMALL = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=32)
LLAMA = dict(num_kv_heads=2, head_dim=8, rope=RopeSpec(theta=500000.0))
SPECS = {
    "llama-scan": LlamaSpec(**SMALL, **LLAMA),
    "qwen3-qknorm": LlamaSpec(**SMALL, **LLAMA, model_type="qwen3", qk_norm=True, tie_word_embeddings=True),
    "mistral-window": LlamaSpec(**SMALL, **LLAMA, model_type="mistral", sliding_window=4, scan_layers=False),
    "gpt2-scan": GPT2Spec(**SMALL),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
N = 6


def random_model(spec) -> tuple[nnx.GraphDef, nnx.State]:
    model = (GPT2Model if isinstance(spec, GPT2Spec) else LlamaModel)(spec, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return graphdef, jax.tree.map(lambda x: 5 * x, params)  # logits far from ties


@pytest.mark.parametrize("name", list(SPECS))
def test_cached_greedy_equals_full_forward_and_batch_equals_alone(name):
    graphdef, params = random_model(SPECS[name])
    batched = generate((graphdef, params), PROMPTS, N)
    expected = [reference_greedy(graphdef, params, p, N) for p in PROMPTS]
    assert batched == expected
    assert len({tuple(t) for t in batched}) > 1  # not a degenerate constant output


def test_cached_logits_equal_full_forward_logits():
    graphdef, params = random_model(SPECS["mistral-window"])
    ids = np.asarray([PROMPTS[0] + [20, 21, 22]], np.int32)  # 10 tokens, window 4
    full = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids))

    @jax.jit
    def cached(p, x):
        model = nnx.merge(graphdef, p)
        start, cache = jnp.zeros((1,), jnp.int32), model.init_cache(1, 10)
        prefill, cache = model.decode_with_cache(x[:, :7], cache, 0, start)
        steps = [prefill]
        for i in range(7, 10):
            logits, cache = model.decode_with_cache(x[:, i : i + 1], cache, i, start)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    np.testing.assert_allclose(np.asarray(cached(params, ids)), full, atol=2e-5)


def test_eos_stops_a_row_and_gpt2_positions_are_enforced():
    graphdef, params = random_model(SPECS["gpt2-scan"])
    free = generate((graphdef, params), PROMPTS, N)
    eos = free[0][2]
    stopped = generate((graphdef, params), PROMPTS, N, eos_ids=[eos])
    assert stopped[0] == free[0][:2]
    for row, full in zip(stopped[1:], free[1:]):
        assert row == full[: full.index(eos)] if eos in full else row == full
    with pytest.raises(GenerateError, match="exceeds the model's 32 positions"):
        generate((graphdef, params), [[1] * 30], 3)
    with pytest.raises(GenerateError, match="max_new_tokens: must be > 0"):
        generate((graphdef, params), PROMPTS, 0)


def test_sampling_is_seeded_and_tempered():
    graphdef, params = random_model(SPECS["llama-scan"])
    model = (graphdef, params)
    greedy = generate(model, PROMPTS, N)
    a = generate(model, PROMPTS, N, temperature=1.0, seed=1)
    assert a == generate(model, PROMPTS, N, temperature=1.0, seed=1)
    assert a != generate(model, PROMPTS, N, temperature=1.0, seed=2)
    assert a != greedy
    assert generate(model, PROMPTS, N, temperature=1e-4, seed=3) == greedy
    # top-k and top-p share one compiled loop (only greedy-or-not, k and whether top-p cuts are static).
    assert generate(model, PROMPTS, N, temperature=2.0, top_k=5, top_p=1e-6, seed=4) == greedy
    nucleus = generate(model, PROMPTS, N, temperature=1.0, top_k=5, top_p=0.9, seed=6)
    assert all(len(row) == N and all(0 <= t < V for t in row) for row in nucleus) and nucleus != greedy


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_transformers_generate(tmp_path, family):
    eos = V - 1
    if family == "llama":
        config = LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.3,
            max_position_embeddings=64,
            eos_token_id=eos,
            bos_token_id=0,
        )
        folder = save_tiny_llama(tmp_path / family, config)
    else:
        config = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, eos_token_id=eos, initializer_range=0.3)
        folder = save_tiny_gpt2(tmp_path / family, config=config)
    ours = generate(jaxft.load(str(folder), task="causal-lm"), PROMPTS, 8, eos_ids=[eos])
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for prompt, row in zip(PROMPTS, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0)
        expected = out[0, len(prompt) :].tolist()
        assert row == (expected[: expected.index(eos)] if eos in expected else expected)
    assert len({tuple(r) for r in ours}) > 1


# ---- the CLI on a tiny trained run ---------------------------------------------------------------------------

CLM = str(Path(__file__).resolve().parents[1] / "configs" / "gpt2_clm.py")
CHATS = [
    ("what is the capital of france ?", "paris ."),
    ("hello there", "hi ."),
    ("one two three", "four five six ."),
    ("a b c", "d e f ."),
]
SAMPLE = "what is the capital of france ?"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, data_dir) -> Path:
    """A GPT-2 chat fine-tune of 2 steps on a word-level tokenizer, with eval-time samples."""
    root = tmp_path_factory.mktemp("generate")
    config = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = save_tokenizer(save_tiny_gpt2(root / "gpt2", config=config), CHATML)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in CHATS * 4))
    run_dir = root / "run"
    args = [f"model.source={model}", f"data.train_files={data}", f"data.eval_files={data}", "data.max_length=32"]
    args += ["train.max_steps=2", "train.eval_every_steps=1", "train.batch_size=8", "train.eval_batch_size=8"]
    args += ["checkpoint.every_steps=2", f"data.sample_prompts={json.dumps([SAMPLE, 'hello there'])}"]
    args += ["train.sample_max_new_tokens=5", "optim.warmup_steps=0", "optim.learning_rate=1e-2"]
    args += ["model.scan_layers=false"]  # GPT-2's unscanned cached path (the unit tests scan it)
    assert cli.main(["train", CLM, "--run-dir", str(run_dir), *args]) == 0
    return run_dir


def test_eval_time_samples_and_cli_generate(chat_run, capsys):
    lines = [json.loads(x) for x in (chat_run / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in lines] == [(s, p) for s in (1, 2) for p in (SAMPLE, "hello there")]
    assert all(isinstance(r["completion"], str) for r in lines)
    assert json.loads((chat_run / "run.json").read_text())["prompt_kind"] == "chat"
    capsys.readouterr()
    assert cli.main(["generate", str(chat_run), "--prompt", SAMPLE, "--max-new-tokens", "5"]) == 0
    # The same checkpoint, prompt rendering and greedy decoding as the step-2 sample.
    assert capsys.readouterr().out == lines[2]["completion"] + "\n"
    argv = ["generate", str(chat_run), "--prompt", SAMPLE, "--prompt", "a b", "--max-new-tokens", "6"]
    argv += ["--temperature", "1.0", "--seed", "7"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first and first.count("--- [") == 2


def test_cli_generate_errors_are_one_line(chat_run, tmp_path, capsys):
    def error(*argv) -> str:
        capsys.readouterr()
        assert cli.main(["generate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert "max_new_tokens: must be > 0" in error(str(chat_run), "--prompt", "hi", "--max-new-tokens", "0")
    long_prompt = " ".join(["one"] * 70)
    assert "exceeds the model's 64 positions" in error(str(chat_run), "--prompt", long_prompt)
    classifier = tmp_path / "classifier"
    shutil.copytree(chat_run, classifier)
    meta = json.loads((classifier / "run.json").read_text())
    meta["config"]["model"]["task"] = "sequence-classification"
    (classifier / "run.json").write_text(json.dumps(meta))
    assert "needs a causal-lm run" in error(str(classifier), "--prompt", "hi")
