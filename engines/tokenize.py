"""Fast tokenization with dynamic padding (each batch padded to its longest text).

Padding to a fixed length roughly halves throughput on tweet-length text, so the
serving path never does it. Uses only the `tokenizers` library (no torch, no transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer as _HFTokenizer

from engines.errors import ModelNotFound
from engines.types import Span, TokenizedText

__all__ = ["DEFAULT_MAX_SEQ_LEN", "Encoded", "Span", "TokenizedText", "Tokenizer"]

DEFAULT_MAX_SEQ_LEN = 256


@dataclass(frozen=True, slots=True)
class Encoded:
    """A padded batch: row i answers text i."""

    input_ids: npt.NDArray[np.int64]  # [n, longest]
    attention_mask: npt.NDArray[np.int64]  # [n, longest]
    truncated: list[bool]  # text i was cut to max_seq_len
    lengths: list[int]  # tokens of text i after truncation (incl. [CLS]/[SEP])

    def __len__(self) -> int:
        return len(self.lengths)


class Tokenizer:
    """Wraps a `tokenizer.json`; truncates to `max_seq_len`, pads per batch."""

    def __init__(self, path: Path, max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> None:
        if max_seq_len < 2:
            raise ValueError("max_seq_len must be at least 2 ([CLS] and [SEP])")
        if not Path(path).is_file():
            raise ModelNotFound(f"tokenizer file {path} is missing: rebuild the engine")
        tok = _HFTokenizer.from_file(str(path))
        tok.no_padding()
        tok.enable_truncation(max_length=max_seq_len)
        self._tok = tok
        # The same tokenizer untruncated and without special tokens: where windows start.
        whole = _HFTokenizer.from_str(tok.to_str())
        whole.no_truncation()
        self._whole = whole
        self._specials = tok.num_special_tokens_to_add(False)
        self.max_seq_len = max_seq_len
        pad = next((i for t in ("[PAD]", "<pad>") if (i := tok.token_to_id(t)) is not None), None)
        self.pad_id = 0 if pad is None else int(pad)  # BERT [PAD] 0, MPNet <pad> 1

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Token ids of each text (truncated, unpadded)."""
        encodings = self._tok.encode_batch(list(texts))
        return [TokenizedText(list(e.ids), bool(e.overflowing)) for e in encodings]

    def pad(self, items: Sequence[TokenizedText]) -> Encoded:
        """Pad already-tokenized texts to the longest among them."""
        n = len(items)
        longest = max((len(t.ids) for t in items), default=0)
        ids = np.full((n, longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, longest), dtype=np.int64)
        for i, t in enumerate(items):
            ids[i, : len(t.ids)] = t.ids
            mask[i, : len(t.ids)] = 1
        return Encoded(ids, mask, [t.truncated for t in items], [len(t.ids) for t in items])

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Tokenize and pad one batch."""
        return self.pad(self.tokenize(texts))

    def windows(
        self, text: str, max_windows: int, overlap: int | None = None
    ) -> tuple[list[Span], bool]:
        """Character spans of up to ``max_windows`` overlapping windows of ``text`` that each
        fit the sequence length with the special tokens; the first is what truncation keeps.
        Consecutive windows share ``overlap`` tokens (default: an eighth of a window), so a
        sentence cut by one window's end is whole in the next. A text that fits is one span.
        Also says whether the windows reach the text's last token."""
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        body = max(1, self.max_seq_len - self._specials)
        shared = body // 8 if overlap is None else overlap
        if not 0 <= shared < body:
            raise ValueError(f"overlap must be in 0..{body - 1} tokens, got {overlap}")
        offsets = self._whole.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= body:
            return [Span(0, len(text))], True
        spans: list[Span] = []
        start = 0
        while len(spans) < max_windows and start < len(offsets):
            end = min(start + body, len(offsets))
            spans.append(Span(offsets[start][0], offsets[end - 1][1]))
            if end == len(offsets):
                return spans, True
            start = end - shared
        return spans, False

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.ids) for t in self.tokenize(texts)]
