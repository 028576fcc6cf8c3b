"""A stand-in `bert-base-uncased` tokenizer in a Hugging Face cache, for machines with no Hub.

LAVIS's BLIP models call `BertTokenizer.from_pretrained("bert-base-uncased")` when they are
built. Offline, this writes an uncased WordPiece vocabulary of the real size (30522) with the
real special-token ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103) where
`from_pretrained` looks for it (`$HF_HOME/hub/models--bert-base-uncased/snapshots/...`), so
that the models build and their shapes match real checkpoints. Its other tokens are not BERT's:
it is for tests and random-weight runs only. With real weights, use the real tokenizer
(`hf download bert-base-uncased vocab.txt tokenizer_config.json config.json`).

    python standin_vocab.py [HF_HOME]      # default: $HF_HOME, else ~/.cache/huggingface

Pure Python (no transformers needed), idempotent: an existing cache entry is left alone.
"""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

REPO = "bert-base-uncased"
VOCAB_SIZE = 30522
SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
# A fixed, fake commit: the cache layout needs one; nothing checks it against the Hub.
REVISION = "0" * 40

# Enough real words that test captions read as words; anything else splits into characters.
WORDS = """a an the of in on at to with and or is are was were be been this that there it its
picture photo image view close up man woman person people child boy girl dog cat bird horse
car bus train truck bike bicycle street road city building house room table chair bed kitchen
food pizza plate cup water sky tree grass field beach sea ocean mountain snow sitting standing
walking riding holding playing looking large small big little white black red blue green yellow
brown gray grey orange pink purple two three group some front top side next near over under
background wooden old new young""".split()


def vocabulary() -> list[str]:
    tokens = [f"[unused{i}]" for i in range(VOCAB_SIZE)]
    for index, token in SPECIAL.items():
        tokens[index] = token
    body = list(string.ascii_lowercase + string.digits + string.punctuation)
    body += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    body += [word for word in dict.fromkeys(WORDS) if word not in body]
    start = 999  # after [unused993], as in the real vocabulary
    for offset, token in enumerate(body):
        tokens[start + offset] = token
    for index in range(start + len(body), VOCAB_SIZE):
        tokens[index] = f"standin{index}"
    assert len(tokens) == len(set(tokens)) == VOCAB_SIZE
    return tokens


def snapshot_dir(hf_home: str | os.PathLike[str]) -> Path:
    return Path(hf_home) / "hub" / f"models--{REPO}" / "snapshots" / REVISION


def write(hf_home: str | os.PathLike[str]) -> Path:
    """The snapshot folder, written unless the cache holds a `bert-base-uncased` vocabulary
    already (the stand-in, or the real one: that is never shadowed)."""
    snapshot = snapshot_dir(hf_home)
    repo = snapshot.parent.parent
    existing = sorted((repo / "snapshots").glob("*/vocab.txt"))
    if existing:
        return existing[0].parent
    # transformers 4.26 migrates a cache without this marker (and says so at every start).
    (Path(hf_home) / "hub").mkdir(parents=True, exist_ok=True)
    marker = Path(hf_home) / "hub" / "version.txt"
    if not marker.exists():
        marker.write_text("1")
    staging = repo / f"snapshots/.{REVISION}.{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    (staging / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512})
    )
    (staging / "config.json").write_text(
        json.dumps({"model_type": "bert", "vocab_size": VOCAB_SIZE, "standin": True})
    )
    try:
        staging.rename(snapshot)
    except OSError:  # another process wrote it first
        for child in staging.iterdir():
            child.unlink()
        staging.rmdir()
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


if __name__ == "__main__":
    home = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    )
    print(write(home))
