"""Trains speedserve's small real model from scratch on Debian's English text (corpus.py).

    python3 tools/speed-tune/train_base.py --speedctl build/bin/speedctl --out models/fortune-llama \
        [--minutes 40] [--seed 1] [--threads 2]

Steps: build the corpus; train a byte-level BPE tokenizer (bpe.py); tokenize every document with
the engine (`speedctl tokenize --jsonl`, so training sees exactly the ids serving will); pack the
training documents into fixed-length sequences; train a Llama (speedllama.py) with AdamW, a
linear warm-up and a cosine decay, for a fixed number of steps sized to the time budget; report
the held-out perplexity at full depth; write the checkpoint (bf16 safetensors, config.json,
tokenizer files) and the training record (`train_log.csv`, `train_report.json`, `loss.svg`).

Everything is seeded: the same packages, seed and step count give the same model on the same
torch build. The step count is fixed before training from a short timing run, and written to the
report, so `--steps N` reproduces a run exactly whatever the machine's speed.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe  # noqa: E402
import corpus  # noqa: E402
import speedllama as sl  # noqa: E402
import svgplot  # noqa: E402


def tokenize_segments(speedctl, model_dir, segments):
    """ids of every segment, tokenized by the engine in one `speedctl tokenize --jsonl` run."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        for s in segments:
            f.write(json.dumps({"text": s}) + "\n")
        path = f.name
    try:
        out = subprocess.run([speedctl, "tokenize", "--model", model_dir, "--jsonl", path], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    rows = [json.loads(line)["ids"] for line in out.splitlines()]
    if len(rows) != len(segments):
        raise RuntimeError("speedctl tokenize returned %d rows for %d segments" % (len(rows), len(segments)))
    return dict(zip(segments, rows))


def encode_documents(speedctl, model_dir, docs, special):
    """[(ids, held_out)] of every document, in the chat template for chat documents."""
    segs = set(["user", "assistant"])
    for kind, q, text, _ in docs:
        if kind == "chat":
            segs.add("\n\n" + q.strip())
            segs.add("\n\n" + text.strip())
        else:
            segs.add(text)
    ids = tokenize_segments(speedctl, model_dir, sorted(segs))
    bos, eot_text = special["<|begin_of_text|>"], special["<|end_of_text|>"]
    sh, eh, eot = special["<|start_header_id|>"], special["<|end_header_id|>"], special["<|eot_id|>"]
    out = []
    for kind, q, text, held in docs:
        if kind == "chat":
            seq = ([bos, sh] + ids["user"] + [eh] + ids["\n\n" + q.strip()] + [eot, sh] + ids["assistant"] + [eh] +
                   ids["\n\n" + text.strip()] + [eot])
        else:
            seq = [bos] + ids[text] + [eot_text]
        out.append((seq, held))
    return out


def pack(docs, seq_len, seed):
    """Training documents concatenated in a seeded order and cut into [N, seq_len + 1] rows."""
    rng = random.Random(seed)
    order = [d for d, held in docs if not held]
    rng.shuffle(order)
    stream = [t for d in order for t in d]
    n = len(stream) // (seq_len + 1)
    return torch.tensor(stream[:n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def heldout_perplexity(model, docs, seq_len, batch=16):
    """exp(mean next-token loss) over the held-out documents, each scored alone, at full depth."""
    model.eval()
    total, count = 0.0, 0
    seqs = [d[:seq_len + 1] for d, held in docs if held and len(d) > 2]
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            group = seqs[i:i + batch]
            t = max(len(s) for s in group)
            x = torch.zeros(len(group), t, dtype=torch.long)
            valid = torch.zeros(len(group), t - 1, dtype=torch.bool)
            for j, s in enumerate(group):
                x[j, :len(s)] = torch.tensor(s)
                valid[j, :len(s) - 1] = True
            logits = model(x[:, :-1], sl.causal_masks(model.cfg.num_hidden_layers, t - 1))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="none").view(len(group), t - 1)
            total += float(loss[valid].sum())
            count += int(valid.sum())
    model.train()
    return math.exp(total / max(count, 1)), count


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speedctl", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=40.0, help="time budget that sizes --steps")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps (overrides --minutes)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    docs = corpus.documents()
    train_texts = [t for _, _, t, held in docs if not held] + [q for _, q, _, held in docs if q and not held]
    tokens, merges = bpe.train(train_texts, args.vocab)
    special = bpe.write(args.out, tokens, merges, max_length=args.seq * 4)
    encoded = encode_documents(args.speedctl, args.out, docs, special)
    data = pack(encoded, args.seq, args.seed)
    n_train_tokens = data.numel()
    print("corpus: %d documents, %d training tokens, tokenizer %d tokens (%.0f s)" %
          (len(docs), n_train_tokens, args.vocab, time.time() - t0), flush=True)

    cfg = sl.LlamaConfig(args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn,
                         max_position_embeddings=args.seq * 4, tie_word_embeddings=True,
                         bos_token_id=special["<|begin_of_text|>"],
                         eos_token_id=[special["<|end_of_text|>"], special["<|eot_id|>"]])
    model = sl.Llama(cfg)
    model.init_weights(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    masks = sl.causal_masks(cfg.num_hidden_layers, args.seq)
    gen = torch.Generator().manual_seed(args.seed)

    def step_fn(step, steps):
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
        x = data[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, max(1, steps // 20))
        logits = model(x[:, :-1], masks)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    steps = args.steps
    if steps <= 0:
        # size the run from a timing of a few steps on a throwaway copy of the state
        probe = {k: v.clone() for k, v in model.state_dict().items()}
        gstate = gen.get_state()
        t1 = time.time()
        for i in range(5):
            step_fn(i, 100)
        per_step = (time.time() - t1) / 5
        model.load_state_dict(probe)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen.set_state(gstate)
        steps = max(20, int(args.minutes * 60 / per_step))
        print("%.2f s per step of %d tokens: %d steps in %.0f minutes" %
              (per_step, args.batch * args.seq, steps, args.minutes), flush=True)

    log = [("step", "tokens", "loss", "heldout_ppl", "seconds")]
    t_train = time.time()
    ema = None
    for step in range(steps):
        loss = step_fn(step, steps)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        last = step == steps - 1
        if step % 50 == 0 or last:
            ppl = ""
            if step % 500 == 0 or last:
                ppl = "%.3f" % heldout_perplexity(model, encoded, args.seq)[0]
            log.append((step, (step + 1) * args.batch * args.seq, "%.4f" % ema, ppl, "%.0f" % (time.time() - t_train)))
            print("step %d/%d loss %.3f %s(%.0f s)" % (step, steps, ema, ("held-out ppl " + ppl + " ") if ppl else "",
                                                       time.time() - t_train), flush=True)
    train_seconds = time.time() - t_train
    ppl, n_eval = heldout_perplexity(model, encoded, args.seq)
    sl.save_checkpoint(model, args.out, torch.bfloat16)
    # the perplexity of what was written (bf16 weights), which is what the engine serves
    _, saved = sl.load_checkpoint(args.out)
    ppl_bf16, _ = heldout_perplexity(saved, encoded, args.seq)

    with open(os.path.join(args.out, "train_log.csv"), "w") as f:
        for row in log:
            f.write(",".join(str(x) for x in row) + "\n")
    report = {
        "command": " ".join(["tools/speed-tune/train_base.py"] + sys.argv[1:]),
        "seed": args.seed, "steps": steps, "threads": args.threads, "torch": torch.__version__,
        "parameters": n_params, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
        "training_tokens_seen": steps * args.batch * args.seq, "corpus_training_tokens": n_train_tokens,
        "documents": len(docs), "heldout_documents": sum(1 for _, h in encoded if h), "heldout_tokens": n_eval,
        "heldout_perplexity_f32": round(ppl, 3), "heldout_perplexity_bf16": round(ppl_bf16, 3),
        "train_seconds": round(train_seconds), "total_seconds": round(time.time() - t0),
    }
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    pts = [(int(r[1]), float(r[2])) for r in log[1:]]
    svgplot.line_chart(os.path.join(args.out, "loss.svg"), "Training loss (EMA) of %s" % os.path.basename(args.out),
                       "tokens seen", "loss (nats/token)", [("train loss", pts)])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
