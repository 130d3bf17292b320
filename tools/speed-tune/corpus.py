"""The training text of the small model: freely licensed English from two Debian packages.

- `fortunes` (/usr/share/games/fortunes; BSD-style licence, debian/copyright of the package):
  quotations, jokes and sayings, one per record, records separated by lines holding `%`.
  The art files (ASCII pictures) are left out.
- `dict-gcide` (/usr/share/dictd/gcide.*; GPL-3+, the GNU Collaborative International
  Dictionary of English, mostly Webster's 1913): headwords and definitions. Entries are cleaned
  of the dictionary's markup (pronunciation `\\A*buse"\\`, braces, `[1913 Webster]` lines).

Every record becomes one document, either plain text or a chat exchange in the model's chat
template (a user asks for a fortune or for a word's meaning; the assistant answers with the
record), so the served chat demo answers in English-like text. Which form a record takes, and
whether it is held out for evaluation, follow from a hash of its text: the corpus is the same on
every machine with the same packages, whatever the order of files.
"""

import base64
import gzip
import hashlib
import os
import re

FORTUNE_DIR = "/usr/share/games/fortunes"
GCIDE_DICT = "/usr/share/dictd/gcide.dict.dz"
GCIDE_INDEX = "/usr/share/dictd/gcide.index"
SKIP_FORTUNES = {"art", "ascii-art"}

FORTUNE_QUESTIONS = [
    "Tell me a fortune.",
    "Say something wise.",
    "Tell me something funny.",
    "Give me a quote about {topic}.",
    "Tell me something about {topic}.",
    "What do people say about {topic}?",
]
WORD_QUESTIONS = [
    "What does \"{word}\" mean?",
    "Define {word}.",
    "What is the meaning of the word {word}?",
]


def stable_hash(text):
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def fortunes():
    """(topic, text) for every fortune record."""
    out = []
    for name in sorted(os.listdir(FORTUNE_DIR)):
        path = os.path.join(FORTUNE_DIR, name)
        if "." in name or name in SKIP_FORTUNES or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        for rec in re.split(r"(?m)^%\s*$", raw):
            lines = [ln.rstrip() for ln in rec.strip("\n").split("\n")]
            text = "\n".join(ln.strip() if ln.strip().startswith("--") else ln.lstrip("\t ") for ln in lines).strip()
            if 20 <= len(text) <= 1200 and "\ufffd" not in text:
                out.append((name.replace("-", " "), text))
    return out


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64num(s):
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _clean_definition(body):
    body = re.sub(r"\[[^\]]*(Webster|PJC|WordNet|Century|Obs\.)[^\]]*\]", " ", body)
    body = re.sub(r"\\[^\\]*\\", " ", body)  # pronunciation
    body = body.replace("{", "").replace("}", "")
    body = re.sub(r"--\s*[A-Z][\w. ]*\.", " ", body)  # citations like --Shak.
    body = re.sub(r"\s+", " ", body).strip()
    return body


def definitions(limit_chars=420, keep_one_in=3):
    """(word, text) for a deterministic third of the single-word GCIDE headwords."""
    data = gzip.open(GCIDE_DICT).read().decode("utf-8", errors="replace")
    out, seen = [], set()
    with open(GCIDE_INDEX, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                continue
            word, off, ln = parts[0], _b64num(parts[1]), _b64num(parts[2])
            if not re.fullmatch(r"[A-Za-z][a-z]{2,16}", word) or word.lower() in seen:
                continue
            if stable_hash(word) % keep_one_in:
                continue
            seen.add(word.lower())
            body = data[off:off + ln]
            first = body.split("\n", 1)[1] if "\n" in body else body
            text = _clean_definition(first)
            if len(text) < 30:
                continue
            if len(text) > limit_chars:
                cut = text.rfind(". ", 0, limit_chars)
                text = text[:cut + 1] if cut > 40 else text[:limit_chars]
            out.append((word, "%s: %s" % (word.capitalize(), text)))
    return out


def documents():
    """[(kind, user_message_or_None, text, held_out)] of the whole corpus, in a fixed order."""
    docs = []
    for topic, text in fortunes():
        h = stable_hash(text)
        held = h % 50 == 0
        if (h >> 8) % 2:
            q = FORTUNE_QUESTIONS[(h >> 16) % len(FORTUNE_QUESTIONS)].format(topic=topic)
            docs.append(("chat", q, text, held))
        else:
            docs.append(("text", None, text, held))
    for word, text in definitions():
        h = stable_hash(text)
        held = h % 50 == 0
        if (h >> 8) % 2:
            q = WORD_QUESTIONS[(h >> 16) % len(WORD_QUESTIONS)].format(word=word.lower())
            docs.append(("chat", q, text, held))
        else:
            docs.append(("text", None, text, held))
    return docs


def write_jsonl(path, held_out):
    """The plain-text documents of one split as {"text": ...} lines (speed_tune.py and speedctl eval read them)."""
    import json
    with open(path, "w", encoding="utf-8") as f:
        for kind, _, text, held in documents():
            if held == held_out and kind == "text":
                f.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] in ("--train", "--heldout"):
        write_jsonl(sys.argv[2], sys.argv[1] == "--heldout")
        sys.exit(0)
    d = documents()
    chars = sum(len(t) for _, _, t, _ in d)
    print("%d documents, %d chars, %d held out" % (len(d), chars, sum(1 for x in d if x[3])))
    for x in d[:3] + d[-3:]:
        print(x)
