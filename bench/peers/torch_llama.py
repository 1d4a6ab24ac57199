"""Peer benchmark: PyTorch eager LlamaForCausalLM.

Full fine-tune of a randomly initialised decoder with the shape of jaxft's `llama-tiny`
(bench/decoder_throughput.py: vocab 8192, hidden 512, 8 layers, 8 heads / 4 KV heads,
head_dim 64, SwiGLU 1408, untied LM head), causal-LM loss, torch.optim.AdamW,
model.train(), eager mode (no torch.compile), transformers' default attention
implementation. Same protocol as the other peers: 2 warmup steps, then --steps timed
steps. tokens_per_sec and step_ms come from the median timed step, as in
bench/decoder_throughput.py (the figures it is read against).

  .bench-venvs/torch/bin/python bench/peers/torch_llama.py [--batch 8] [--seq 256] [--steps 5] --json

Runs in the torch venv (bench/peers/requirements-torch.txt, CPU torch wheel;
bench/run_peers.sh makes it). No checkpoint and no download: the weights are the
model's own random init.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: bench/decoder_throughput.py's for llama-tiny.
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1408,
        hidden_act="silu",
        # jaxft's LlamaSpec defaults, which llama-tiny keeps (and HF's Flax peer uses).
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    model.train()

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones((args.batch, args.seq), dtype=torch.long)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def run_one() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Next-token prediction: position t predicts token t+1 (the Flax peer's loss).
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, config.vocab_size), input_ids[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(args.warmup):
        loss = run_one()

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = run_one()  # CPU eager: synchronous, nothing left in flight
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    tokens_per_sec = args.batch * args.seq / step_s
    if not math.isfinite(loss.item()):
        print(f"non-finite loss: {loss.item()}", file=sys.stderr)
        return 1

    result = {
        "impl": "torch-eager",
        "model": "llama-tiny",
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_ms": round(1000.0 * step_s, 2),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "params": sum(t.numel() for t in model.parameters()),
        "attn": model.config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    # Per-step spread on stderr (stdout stays one JSON line): on a shared 2-core
    # machine the min is the least contended estimate.
    ms = sorted(1000.0 * t for t in times)
    print(
        f"torch-llama: step ms min {ms[0]:.1f} / median {1000.0 * step_s:.1f} / max {ms[-1]:.1f}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"torch-llama: {tokens_per_sec:,.0f} tokens/s, {1000.0 * step_s:.1f} ms/step "
            f"(batch {args.batch} x seq {args.seq}, {args.steps} steps, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"threads {torch.get_num_threads()}, final loss {loss.item():.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
