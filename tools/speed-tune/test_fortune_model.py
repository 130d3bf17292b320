"""The committed model (models/fortune-llama) is the trained model its record says, served by the engine.

    python3 tools/speed-tune/test_fortune_model.py SPEEDCTL REPO WORKDIR

Checks, each of which a misread, corrupted or untrained checkpoint fails:
- the checkpoint stays under 10 MB and loads (`speedctl inspect`);
- the engine's perplexity on held-out text at full depth (`speedctl eval`, C = L) is within a
  factor 2 of the held-out perplexity the training program measured in PyTorch
  (train_report.json). The two score different tokens of the held-out documents (eval: tokens
  17-48 of the plain-text documents of 48 tokens or more; training: every token of every held-out
  document, chat documents with their predictable template tokens included), so they are close,
  not equal (55 against 35 for the committed model); a misread or untrained checkpoint scores in
  the thousands (4017 before training). Exact agreement of the engine with PyTorch on the same
  weights is test_speedllama's job;
- a greedy chat answer is made of words: at least 70% of its words occur in the training text;
- the SPEED-tuned models/fortune-llama-speed stays under 10 MB, and at C = 6 (3L/4) its KL from
  the base's full depth (`speedctl eval --reference-model`) is at most half the untuned base's
  at C = 6, while its own full depth stays closer to the base's than that.
Exit 0 pass, 1 fail, 77 skip (the corpus packages are missing: deploy/setup.sh installs them).
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    speedctl, repo, work = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(work, exist_ok=True)
    import corpus
    if not os.path.isdir(corpus.FORTUNE_DIR) or not os.path.exists(corpus.GCIDE_DICT):
        print("skip: the fortunes and dict-gcide packages are not installed (deploy/setup.sh installs them)")
        return 77
    model = os.path.join(repo, "models", "fortune-llama")
    failures = []
    size = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model))
    if size >= 10 * 1024 * 1024:
        failures.append("the model directory holds %d bytes (limit 10 MB)" % size)
    with open(os.path.join(model, "train_report.json")) as f:
        report = json.load(f)
    subprocess.run([speedctl, "inspect", model], check=True, capture_output=True)

    heldout = os.path.join(work, "heldout.jsonl")
    corpus.write_jsonl(heldout, True)
    out = subprocess.run([speedctl, "eval", "--model", model, "--data", heldout, "--prompt-tokens", "16",
                          "--continuation-tokens", "32", "--prefill-layers", "1.0", "--json", "--threads", "2"],
                         check=True, capture_output=True, text=True).stdout
    res = json.loads(out)["results"]
    ppl = res[0]["perplexity"]
    want = report["heldout_perplexity_bf16"]
    print("held-out perplexity: engine %.3f (eval windows), training record %.3f (whole documents)" % (ppl, want))
    if not want / 2 <= ppl <= 2 * want:
        failures.append("engine perplexity %.3f is not within a factor 2 of the record's %.3f" % (ppl, want))
    if ppl > report["vocab"] / 20:
        failures.append("perplexity %.1f is near a uniform guess over %d tokens" % (ppl, report["vocab"]))

    gen = subprocess.run([speedctl, "generate", "--model", model, "--chat", "Tell me a fortune.", "--max-tokens",
                          "48", "--json", "--threads", "2"], check=True, capture_output=True, text=True).stdout
    text = json.loads(gen)["text"]
    known = set()
    for _, q, t, _ in corpus.documents():
        known.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    share = sum(1 for w in words if w in known) / max(1, len(words))
    print("chat answer: %r (%d words, %.0f%% known)" % (text, len(words), 100 * share))
    if len(words) < 5 or share < 0.7:
        failures.append("the chat answer is not made of words (%d words, %.0f%% known)" % (len(words), 100 * share))

    # the SPEED-tuned model (models/fortune-llama-speed): at C = 6 = 3L/4 it closes at least half of
    # the KL gap untuned SPEED opens against the base's full depth, and its own full depth stays
    # closer to the base's than the untuned C = 6 is
    tuned = os.path.join(repo, "models", "fortune-llama-speed")
    size = sum(os.path.getsize(os.path.join(tuned, f)) for f in os.listdir(tuned))
    if size >= 10 * 1024 * 1024:
        failures.append("the tuned model directory holds %d bytes (limit 10 MB)" % size)

    def kl(m, cutoffs, ref=None):
        args = [speedctl, "eval", "--model", m, "--data", heldout, "--prompt-tokens", "32", "--continuation-tokens",
                "24", "--prefill-layers", cutoffs, "--json", "--threads", "2", "--batch", "12", "--no-progress"]
        if ref:
            args += ["--reference-model", ref]
        r = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)["results"]
        return {e["prefill_layers"]: e["kl_mean"] for e in r}
    untuned, tuned_kl = kl(model, "6"), kl(tuned, "6,8", model)
    print("KL at C = 6 against the base's full depth: untuned %.4f, tuned %.4f (tuned at full depth %.4f)" %
          (untuned[6], tuned_kl[6], tuned_kl[8]))
    if not tuned_kl[6] <= 0.5 * untuned[6]:
        failures.append("the tuned model recovers less than half the KL gap at C = 6 (%.4f vs %.4f)" %
                        (tuned_kl[6], untuned[6]))
    if not tuned_kl[8] < untuned[6]:
        failures.append("the tuned model's full depth moved from the base's by %.4f" % tuned_kl[8])
    for f in failures:
        print("FAIL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
