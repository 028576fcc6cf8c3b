"""Offline setup for the LAVIS tests: no Hub, and a stand-in `bert-base-uncased` vocabulary in
the Hugging Face cache (what LAVIS's BLIP tokenizer loads), before transformers is imported."""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"  # transformers 4.26 reads only this one
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "captionflow-lavis-hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests_lavis import standin_vocab

standin_vocab.write(os.environ["HF_HOME"])
