"""Text for token streams: the model's tokenizer.json, and deltas of a completion's growing text.

The engine decodes each completion's tokens whole after every step (and cuts it at a stop
string). A stream must only ever send text it will not take back, so `TextDeltas` holds back a
trailing U+FFFD (a multi-byte character whose other bytes are in tokens still to come) and, while
the completion runs, the last `len(longest stop string) - 1` characters (the start of a stop
string that the next token may complete).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from libs.common.errors import InvalidArgument

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(model_dir: Path, root: Path) -> Tokenizer | None:
    """The model folder's tokenizer.json, or None when it has none; a link out of `root` is refused."""
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    if not path.resolve().is_relative_to(root):
        raise InvalidArgument(f"{TOKENIZER_FILE} leads outside the artifact store", field="path")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise InvalidArgument(f"{TOKENIZER_FILE} cannot be read: {e}", field="path") from None


class TextDeltas:
    """One completion's text, handed out in pieces that are final."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def take(self, text: str | None, finished: bool) -> str:
        """The text not sent yet that is safe to send now (all of it once finished)."""
        if text is None:
            return ""
        end = len(text) if finished else len(text.rstrip("\ufffd")) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta
