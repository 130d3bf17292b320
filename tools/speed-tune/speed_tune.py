"""SPEED-tuning: teaches a Llama checkpoint to keep its full-depth answers under SPEED's visibility.

    python3 tools/speed-tune/speed_tune.py --model DIR --data FILE --out DIR \
        [--prefill-layers 0.75[,0.5,...]] [--anchors 1 --tail 1] [--steps 2000] [--device cpu|cuda] \
        [--dtype f32|bf16] [--checkpointing] [--chat FILE.jsonl]

Self-distillation. The teacher is the checkpoint itself, frozen, at full depth. The student is
the same weights under SPEED's visibility (speedllama.speed_key_visible: the prompt's shallow
tokens exist only in layers < C; anchors, tail and generated tokens at full depth — the engine's
rule, held to the engine by test_speedllama.py). Each step cuts a training text into a prompt of
a random length and a continuation; the loss is KL(teacher || student) over the positions that
predict the continuation (the last prompt token and every continuation token but the last), which
are the positions whose logits a served request samples from. Each step draws its cutoff from
--prefill-layers; `1.0` (C = L) in the list keeps full-depth behaviour anchored to the teacher.
--chat adds supervised fine-tuning on chat records at the same cutoffs: each JSONL line is
{"messages": [{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant", ...}]}, the
prompt rendered by the engine's chat template (`speedctl tokenize --chat`, exactly as the router
renders a request) and the answer followed by the template's end-of-turn token; or
{"ids": [...], "prompt_tokens": N}. The loss is the cross-entropy of the answer tokens with the
prompt run as serving runs it (shallow below C), one record per step beside the distillation batch.

Data (--data): text files (documents separated by blank lines) or JSONL with {"text": ...} or
{"ids": [...]}; text is tokenized by the engine (--speedctl) so ids match serving exactly.

Writes the tuned weights in the Hugging Face layout (config.json, model.safetensors, the
tokenizer files copied) in the checkpoint's dtype, plus tune_log.csv and tune_report.json.

Memory (weights + AdamW state + the frozen teacher): about 4 + 4 + 8 + 2 bytes per parameter
in f32 master weights with a bf16 teacher, so ~150 GB for an 8B model on one device before
activations; use --dtype bf16 (weights and optimizer in bf16: ~6 bytes/parameter plus the
teacher, ~64 GB for 8B) with --checkpointing on an 80 GB GPU, or shard with FSDP (not built
in). Activations with --checkpointing: one layer's worth per sequence, ~2 x seq x hidden x
(4 + heads x seq / hidden) bytes per layer.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speedllama as sl  # noqa: E402


def resolve_cutoff(text, n_layers):
    """engine/depth's rule: an integer 1..L is a count, a number with a point a fraction of L."""
    if "." in text:
        f = float(text)
        if not 0 < f <= 1:
            raise ValueError("prefill_layers %s: a fraction must lie in (0, 1]" % text)
        return max(1, int(math.floor(f * n_layers + 0.5)))
    c = int(text)
    if not 1 <= c <= n_layers:
        raise ValueError("prefill_layers %d is outside 1..%d" % (c, n_layers))
    return c


def jsonl_records(path, raw):
    """(line number, object) of every non-blank line of a JSONL text; a bad line names file:line."""
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError as e:
            raise ValueError("%s:%d: %s" % (path, n, e))


def read_records(path, speedctl, model_dir):
    """Token id lists of every record of a text or JSONL file."""
    texts, ids = [], []
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if path.endswith(".jsonl"):
        for n, rec in jsonl_records(path, raw):
            if "ids" in rec:
                ids.append([int(x) for x in rec["ids"]])
            elif "text" in rec:
                texts.append(rec["text"])
            else:
                raise ValueError("%s:%d: a record needs \"text\" or \"ids\"" % (path, n))
    else:
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
    if texts:
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".speed_tune_tok.jsonl")
        tmp = tmp if os.access(os.path.dirname(tmp), os.W_OK) else "/tmp/.speed_tune_tok.jsonl"
        with open(tmp, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        try:
            out = subprocess.run([speedctl, "tokenize", "--model", model_dir, "--jsonl", tmp, "--add-special"],
                                 check=True, capture_output=True, text=True).stdout
        finally:
            os.unlink(tmp)
        ids += [json.loads(line)["ids"] for line in out.splitlines()]
    return ids


def read_chat(path, speedctl, model_dir):
    """(ids, n_prompt) of every chat record of a JSONL file (see the module docstring)."""
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    end_of_turn = "<|eot_id|>" if "<|eot_id|>" in tcfg.get("chat_template", "") else tcfg.get("eos_token", "")

    def tokenize(*args):
        out = subprocess.run([speedctl, "tokenize", "--model", model_dir, "--json"] + list(args), check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)["ids"]

    recs = []
    with open(path, encoding="utf-8") as f:
        for n, rec in jsonl_records(path, f.read()):
            if "ids" in rec and "prompt_tokens" in rec:
                ids, np_ = [int(x) for x in rec["ids"]], int(rec["prompt_tokens"])
            elif "messages" in rec:
                msgs = rec["messages"]
                ok = isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    for m in msgs)
                roles = [m.get("role") for m in msgs] if ok else []
                if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
                    raise ValueError("%s:%d: messages must be [system?, user, assistant] with text contents, got %s" %
                                     (path, n, roles))
                sys_args = ["--system", msgs[0]["content"]] if roles[0] == "system" else []
                prompt = tokenize("--chat", msgs[-2]["content"], *sys_args)
                answer = tokenize("--text", msgs[-1]["content"].strip() + end_of_turn)
                ids, np_ = prompt + answer, len(prompt)
            else:
                raise ValueError("%s:%d: a chat record needs \"messages\" or \"ids\" with \"prompt_tokens\"" % (path, n))
            if not 1 <= np_ < len(ids):
                raise ValueError("%s:%d: the prompt must leave at least one answer token" % (path, n))
            recs.append((ids, np_))
    return recs


def sft_loss(student, y, n, c, anchors, tail):
    """Cross-entropy of y[n:] given y[:n] run as serving runs it at cutoff c (one record, [1, T])."""
    L = student.cfg.num_hidden_layers
    cls = sl.token_classes(n, y.shape[1], anchors, tail)
    logits = student(y[:, :-1], [m.to(y.device) for m in sl.speed_masks(cls[:-1], L, c)])
    return F.cross_entropy(logits[:, n - 1:].reshape(-1, logits.shape[-1]).float(), y[:, n:].reshape(-1))


def batch_for(records, rng, batch, prompt_range, cont):
    """[B, N + M] ids with a shared prompt length N drawn from prompt_range."""
    lo, hi = prompt_range
    n = rng.randint(lo, hi)
    need = n + cont
    pool = [r for r in records if len(r) >= need]
    if not pool:
        return None, n
    rows = []
    for _ in range(batch):
        r = rng.choice(pool)
        s = rng.randint(0, len(r) - need)
        rows.append(r[s:s + need])
    return torch.tensor(rows, dtype=torch.long), n


def distill_loss(student, teacher, x, n, c, anchors, tail):
    """KL(teacher at full depth || student at cutoff c) over the positions predicting the continuation."""
    L = student.cfg.num_hidden_layers
    t = x.shape[1]
    cls = sl.token_classes(n, t, anchors, tail)
    masks = [m.to(x.device) for m in sl.speed_masks(cls, L, c)]
    with torch.no_grad():
        tl = teacher(x, [m.to(x.device) for m in sl.causal_masks(L, t)])[:, n - 1:t - 1].float()
    sl_ = student(x, masks)[:, n - 1:t - 1].float()
    tp = F.log_softmax(tl, -1)
    sp = F.log_softmax(sl_, -1)
    return (tp.exp() * (tp - sp)).sum(-1).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--speedctl", default="speedctl", help="speedctl binary (tokenizes text as serving does)")
    ap.add_argument("--prefill-layers", default="0.75,1.0", help="cutoffs drawn per step (counts or fractions)")
    ap.add_argument("--anchors", type=int, default=1)
    ap.add_argument("--tail", type=int, default=1)
    ap.add_argument("--prompt-tokens", default="32,160", help="prompt length range LO,HI")
    ap.add_argument("--continuation-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for small models: README)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights and optimizer state")
    ap.add_argument("--checkpointing", action="store_true", help="recompute activations (large models)")
    ap.add_argument("--chat", default="", help="optional JSONL of chat records for SFT ({\"messages\": [...]}: "
                    "system?, user, assistant; or {\"ids\": [...], \"prompt_tokens\": N})")
    ap.add_argument("--sft-weight", type=float, default=1.0, help="weight of the SFT loss beside the KL")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg, student = sl.load_checkpoint(args.model, dt)
    _, teacher = sl.load_checkpoint(args.model, dt)
    student, teacher = student.to(args.device), teacher.to(args.device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.checkpointing = args.checkpointing
    student.train()
    L = cfg.num_hidden_layers
    cutoffs = [resolve_cutoff(s.strip(), L) for s in args.prefill_layers.split(",") if s.strip()]
    lo, hi = (int(v) for v in args.prompt_tokens.split(","))
    if not 1 <= lo <= hi:
        raise SystemExit("speed_tune: --prompt-tokens %s: need 1 <= LO <= HI" % args.prompt_tokens)
    records = read_records(args.data, args.speedctl, args.model)
    try:
        sft = read_chat(args.chat, args.speedctl, args.model) if args.chat else []
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        raise SystemExit("speed_tune: --chat: %s" % e)
    if args.chat and not sft:
        raise SystemExit("speed_tune: --chat %s holds no records" % args.chat)
    if not any(len(r) >= lo + args.continuation_tokens for r in records):
        raise SystemExit("speed_tune: no record of %s holds %d tokens" % (args.data, lo + args.continuation_tokens))
    opt = torch.optim.AdamW([p for p in student.parameters()], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log = [("step", "prefill_layers", "kl", "sft_loss", "seconds")]
    t0 = time.time()
    ema = {}
    for step in range(args.steps):
        c = cutoffs[step % len(cutoffs)]
        x, n = batch_for(records, rng, args.batch, (lo, hi), args.continuation_tokens)
        if x is None:
            continue
        x = x.to(args.device)
        warm = min(1.0, (step + 1) / max(1, args.steps // 20))
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * (0.5 * (1 + math.cos(math.pi * step / args.steps)))
        loss = distill_loss(student, teacher, x, n, c, args.anchors, args.tail)
        sft_l = torch.tensor(0.0)
        if sft:
            ids, ny = rng.choice(sft)
            sft_l = sft_loss(student, torch.tensor([ids], dtype=torch.long, device=args.device), ny, c,
                             args.anchors, args.tail)
        total = loss + args.sft_weight * sft_l
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema[c] = float(loss) if c not in ema else 0.95 * ema[c] + 0.05 * float(loss)
        if step % 25 == 0 or step == args.steps - 1:
            log.append((step, c, "%.5f" % ema[c], "%.4f" % float(sft_l), "%.0f" % (time.time() - t0)))
            print("step %d/%d C=%d KL %.4f (%.0f s)" % (step, args.steps, c, ema[c], time.time() - t0), flush=True)

    student = student.to("cpu").float()
    sl.save_checkpoint(student, args.out, {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                           "float32": torch.float32}.get(cfg.torch_dtype, torch.bfloat16))
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        src = os.path.join(args.model, fn)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.out, fn))
    with open(os.path.join(args.out, "tune_log.csv"), "w") as f:
        for row in log:
            f.write(",".join(str(v) for v in row) + "\n")
    report = {"command": " ".join(["tools/speed-tune/speed_tune.py"] + sys.argv[1:]), "base": args.model,
              "cutoffs": cutoffs, "anchors": args.anchors, "tail": args.tail, "steps": args.steps,
              "final_kl_ema": {str(k): round(v, 5) for k, v in ema.items()}, "seconds": round(time.time() - t0)}
    with open(os.path.join(args.out, "tune_report.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
