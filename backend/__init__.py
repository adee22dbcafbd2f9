"""SFT Studio backend: chat templating, preparation, packing and training for supervised finetuning.

Importing this package has no side effects (no torch import, no I/O).
"""

from pathlib import Path

IGNORE_INDEX = -100  # label value that the loss ignores: masked tokens, padding, each document's first position

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
TINY_MODEL = ASSETS / "tiny-llama"
SAMPLE_DATA = ASSETS / "data" / "sample_sharegpt.jsonl"
SAMPLE_DATA_OPENAI = ASSETS / "data" / "sample_openai.jsonl"
TEMPLATE_TOKENIZERS = ASSETS / "tokenizers"  # chatml/, gemma/, mistral/, phi3/, llama-generation/

__all__ = ["IGNORE_INDEX", "ROOT", "ASSETS", "TINY_MODEL", "SAMPLE_DATA", "SAMPLE_DATA_OPENAI", "TEMPLATE_TOKENIZERS"]
