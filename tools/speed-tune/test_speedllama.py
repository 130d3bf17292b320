"""Holds speedllama's SPEED visibility to the engine: same weights, same prompt, same (C, A, T) ->
same greedy tokens and the same log-probabilities as `speedctl generate --json`.

    python3 tools/speed-tune/test_speedllama.py SPEEDCTL WORKDIR

Exit 0 pass, 1 fail, 77 skip (no torch). Models are made by `speedctl make-tiny-model` (f32
weights, f32 KV cache, so the only differences are summation order: tolerance 2e-4 in log-prob).
Checks C = L, several C < L, A = 0/1/2 and T = 1/3, and that the mask matters: the logits with
SPEED differ from the full-depth logits (a mask that were ignored would fail here).
"""

import json
import os
import subprocess
import sys

try:
    import torch
except ImportError:
    print("skip: python3-torch is not installed (deploy/setup.sh installs it)")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speedllama as sl  # noqa: E402

TOL = 2e-4


def engine_generate(speedctl, model_dir, ids, c, a, t, n):
    out = subprocess.run([speedctl, "generate", "--model", model_dir, "--prompt-ids", ",".join(map(str, ids)),
                          "--prefill-layers", str(c), "--anchors", str(a), "--tail", str(t), "--max-tokens", str(n),
                          "--kv-dtype", "f32", "--ignore-eos", "--top-logprobs", "5", "--json", "--threads", "1"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["tokens"]


def torch_generate(model, ids, c, a, t, n):
    """Greedy decoding by full recompute with the SPEED masks: returns [(id, logprob, top5)]."""
    seq = list(ids)
    out = []
    for _ in range(n):
        cls = sl.token_classes(len(ids), len(seq), a, t)
        masks = sl.speed_masks(cls, model.cfg.num_hidden_layers, c)
        with torch.no_grad():
            logits = model(torch.tensor([seq]), masks)[0, -1].double()
        lp = torch.log_softmax(logits, -1)
        top = torch.topk(lp, 5)
        nxt = int(top.indices[0])
        out.append((nxt, float(lp[nxt]), [(int(i), float(v)) for v, i in zip(top.values, top.indices)]))
        seq.append(nxt)
    return out


def main():
    speedctl, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    failures = 0
    for layers, tied, seed in ((4, False, 3), (6, True, 5)):
        mdir = os.path.join(work, "m%d" % layers)
        args = [speedctl, "make-tiny-model", mdir, "--dtype", "f32", "--layers", str(layers), "--seed", str(seed)]
        if tied:
            args.append("--tied")
        subprocess.run(args, check=True, capture_output=True)
        cfg, model = sl.load_checkpoint(mdir)
        model.eval()
        prompt = [cfg.bos_token_id] + [(17 * i + seed) % (cfg.vocab_size - 8) + 3 for i in range(1, 23)]
        full = torch_generate(model, prompt, layers, 1, 1, 1)[0]
        for c, a, t in ((layers, 1, 1), (1, 1, 1), (layers // 2, 1, 1), (layers - 1, 0, 1), (layers // 2, 2, 3)):
            want = engine_generate(speedctl, mdir, prompt, c, a, t, 6)
            got = torch_generate(model, prompt, c, a, t, 6)
            for k, (w, g) in enumerate(zip(want, got)):
                ok = w["id"] == g[0] and abs(w["logprob"] - g[1]) < TOL
                tops = {e["id"]: e["logprob"] for e in w["top_logprobs"]}
                for i, v in g[2]:
                    if i in tops and abs(tops[i] - v) >= TOL:
                        ok = False
                if not ok:
                    print("FAIL L=%d C=%d A=%d T=%d token %d: engine %s %.6f, torch %s %.6f" %
                          (layers, c, a, t, k, w["id"], w["logprob"], g[0], g[1]))
                    failures += 1
                    break
            if c < layers and k == 0:
                pass
        # the mask must matter: SPEED at C=1 moves the first token's distribution
        shallow = torch_generate(model, prompt, 1, 1, 1, 1)[0]
        if abs(shallow[1] - full[1]) < 1e-6 and shallow[2] == full[2]:
            print("FAIL L=%d: C=1 gives the full-depth distribution; the mask has no effect" % layers)
            failures += 1
    print("speedllama vs engine: %s" % ("ok" if failures == 0 else "%d failures" % failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
