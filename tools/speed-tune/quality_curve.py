"""The before/after picture of SPEED-tuning: KL against the base's full depth at every C.

    python3 tools/speed-tune/quality_curve.py BASE.json TUNED.json OUT.svg [--title T]

BASE.json is `speedctl eval --json` of the base model (its own full depth is the reference);
TUNED.json the same records and cutoffs for the tuned model with `--reference-model BASE`. Both
curves then measure the same thing: how far serving at C moves the next-token distribution from
what the base model says at full depth. Also prints the table (markdown) of both runs.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import svgplot  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("out")
    ap.add_argument("--title", default="SPEED-tuning: KL from the base model at full depth")
    a = ap.parse_args()
    runs = [("untuned", json.load(open(a.base))), ("SPEED-tuned", json.load(open(a.tuned)))]
    for name, r in runs:
        if name == "SPEED-tuned" and not r.get("reference_model"):
            raise SystemExit("quality_curve: %s was not run with --reference-model (the base)" % a.tuned)
    series, styles = [], []
    for (name, r), colour in zip(runs, ("#d62728", "#1f77b4")):
        for key, dashed in (("kl_mean", False), ("kl_p90", True)):
            series.append(("%s, KL %s" % (name, key[3:]), sorted((e["prefill_layers"], e[key]) for e in r["results"])))
            styles.append((colour, dashed))
    cs = sorted({e["prefill_layers"] for _, r in runs for e in r["results"]})
    svgplot.line_chart(a.out, a.title, "prefill layers C (of %d)" % runs[0][1]["layers"], "KL (nats)", series,
                       xticks=cs, styles=styles)
    print("| model | C | KL mean | KL p90 | top-1 | perplexity | KV saved |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs:
        for e in sorted(r["results"], key=lambda e: -e["prefill_layers"]):
            print("| %s | %d | %.4f | %.4f | %.1f%% | %.2f | %.1f%% |" % (
                name, e["prefill_layers"], e["kl_mean"], e["kl_p90"], 100 * e["top1_agreement"], e["perplexity"],
                100 * e["kv_saved"]))


if __name__ == "__main__":
    main()
