"""speed_tune.py does what it says, end to end on the committed model (models/fortune-llama).

    python3 tools/speed-tune/test_speed_tune.py SPEEDCTL REPO WORKDIR

Checks, each of which a broken tuning program fails:
- a short run at C = L/2 writes a checkpoint the engine loads, whose KL at C against the base
  model's full depth (`speedctl eval --reference-model`) is well below the untuned model's on the
  text it was tuned on (a run that does not train, trains the wrong visibility or saves the wrong
  weights does not get there);
- with --chat (records in both accepted forms) the SFT loss is logged at every logged step,
  positive and finite. (SFT on a handful of records overfits them within a few dozen steps and
  moves the model away from its base: a real run mixes many records and a small --sft-weight.)
- chat records it cannot use are refused by file and line: a conversation that does not end with
  the assistant, a prompt that leaves no answer.
Exit 0 pass, 1 fail.
"""

import csv
import json
import math
import os
import subprocess
import sys

TEXTS = [
    "A journey of a thousand miles begins with a single step, and the road is long for those who wait.",
    "He who laughs last laughs best, but the one who laughs first has more time to enjoy the joke.",
    "The early bird catches the worm, though the second mouse gets the cheese in the end.",
    "Fortune favors the bold, and a word to the wise is sufficient for the day that comes tomorrow.",
    "Every cloud has a silver lining, and every silver lining has a cloud somewhere behind it.",
    "You will meet a tall dark stranger who will tell you that patience is a virtue of the wise.",
]
CHAT = [
    {"messages": [{"role": "user", "content": "Tell me a fortune."},
                  {"role": "assistant", "content": "You will find what you seek in an unexpected place."}]},
    {"messages": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Define wit."},
                  {"role": "assistant", "content": "The quick perception of the amusing."}]},
]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def main():
    speedctl, repo, work = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(work, exist_ok=True)
    base = os.path.join(repo, "models", "fortune-llama")
    tune = [sys.executable, os.path.join(repo, "tools", "speed-tune", "speed_tune.py"), "--speedctl", speedctl,
            "--model", base]
    failures = []
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t + " " + t}) + "\n")
    chat = os.path.join(work, "chat.jsonl")
    with open(chat, "w") as f:
        for r in CHAT:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"ids": [4091, 65, 798, 46, 4095], "prompt_tokens": 3}) + "\n")
    out, out_sft = os.path.join(work, "tuned"), os.path.join(work, "tuned-sft")
    common = ["--data", data, "--prefill-layers", "0.5", "--prompt-tokens", "12,20", "--continuation-tokens", "8",
              "--batch", "4", "--seed", "3", "--threads", "1"]
    for args in (["--out", out, "--steps", "30", "--lr", "1e-4"],
                 ["--out", out_sft, "--steps", "6", "--lr", "1e-4", "--chat", chat]):
        r = run(tune + common + args)
        if r.returncode != 0:
            print(r.stdout, r.stderr)
            return 1

    def kl(model, ref=None):
        args = [speedctl, "eval", "--model", model, "--data", data, "--prompt-tokens", "16", "--continuation-tokens",
                "12", "--prefill-layers", "4", "--json", "--no-progress"]
        if ref:
            args += ["--reference-model", ref]
        e = run(args, check=True)
        return json.loads(e.stdout)["results"][0]["kl_mean"]

    before, after = kl(base), kl(out, base)
    print("KL at C = 4 against the base's full depth: untuned %.4f, tuned %.4f" % (before, after))
    if not after < 0.7 * before:
        failures.append("tuning did not lower the KL at C = 4 (%.4f -> %.4f)" % (before, after))
    with open(os.path.join(out_sft, "tune_log.csv")) as f:
        rows = list(csv.DictReader(f))
    sft = [float(x["sft_loss"]) for x in rows]
    print("SFT loss at the logged steps:", sft)
    if not rows or not all(math.isfinite(x) and x > 0 for x in sft):
        failures.append("the SFT loss is not logged positive and finite: %s" % sft)

    for bad, what in (({"messages": [{"role": "user", "content": "hi"}]}, "messages must be"),
                      ({"ids": [1, 2, 3], "prompt_tokens": 3}, "at least one answer token")):
        path = os.path.join(work, "bad.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(CHAT[0]) + "\n" + json.dumps(bad) + "\n")
        r = run(tune + ["--data", data, "--out", os.path.join(work, "bad"), "--steps", "1", "--chat", path])
        if r.returncode == 0 or what not in r.stderr or "bad.jsonl:2" not in r.stderr:
            failures.append("a bad chat record (%s) was not refused by line: rc %d, %s" % (what, r.returncode,
                                                                                        r.stderr[-300:]))
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
