"""TextStream: one output's text as its tokens arrive — incremental detokenisation and stop strings.

The engine emits token ids only; this is the layer above it (the server, `LLM.generate`) that turns them into
text a client can append to. Two things make that more than `decode`:
- a token may end in the middle of a multi-byte character: `StreamDecoder` holds its bytes back, so the text
  never contains a U+FFFD that a later token would have completed, and successive deltas just concatenate;
- a stop string may arrive split over several tokens or steps: the last `len(longest stop) - 1` characters
  are held back until they cannot begin a stop, so no text past a stop is ever sent.

At a stop the text ends just before it; `num_tokens` is then the number of tokens that produced that text
(every token whose first character lies before the stop), so token ids, logprobs and usage can be cut to
agree with the returned text. Example, stop "\n\n", tokens "a", "b\n", "\nc": the text so far is "ab\n\nc" and the
stop begins at character 2, so the text is "ab"; the second token starts at character 1 (kept), the third at
character 3 (dropped): num_tokens is 2.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] | None = None, skip_special_tokens: bool = True):
        self._dec = tokenizer.stream_decoder(skip_special_tokens)
        self._stops = [s for s in (stop or ()) if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""  # everything decoded so far, sent or not
        self._sent = 0  # characters of _text handed out
        self._starts: list[int] = []  # per token: len(_text) before it
        self.stopped: str | None = None  # the stop string that ended the text
        self._cut: int | None = None  # tokens kept once stopped
        self._ended = False

    @property
    def text(self) -> str:
        """The text handed out so far (all of it after `finish()`)."""
        return self._text[:self._sent]

    @property
    def num_tokens(self) -> int:
        """Tokens that produced the text: all pushed ones, or those up to the stop."""
        return len(self._starts) if self._cut is None else self._cut

    @property
    def released_tokens(self) -> int:
        """Tokens whose text has started to be handed out (all of `num_tokens` once ended): what a stream may
        attach logprobs to without running ahead of the text a stop string could still cut."""
        if self._ended or self.stopped is not None:
            return self.num_tokens
        return bisect.bisect_left(self._starts, self._sent)

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; returns the new text that is safe to send. After a stop, pushes are ignored."""
        if self.stopped is not None:
            return ""
        before = len(self._text)
        for t in token_ids:
            self._starts.append(len(self._text))
            self._text += self._dec.push(t)
        if self._stops:
            # a stop can begin up to len(stop) - 1 characters before the new text
            lo = max(0, before - self._hold)
            hits = [(i, s) for s in self._stops if (i := self._text.find(s, lo)) >= 0]
            if hits:
                at, self.stopped = min(hits)
                self._cut = sum(1 for st in self._starts if st < at)
                self._text = self._text[:at]
                return self._emit(len(self._text))
        return self._emit(max(self._sent, len(self._text) - self._hold))

    def finish(self) -> str:
        """The output ended (EOS, length, abort): flush what was held back."""
        self._ended = True
        if self.stopped is None:
            self._text += self._dec.flush()
        return self._emit(len(self._text))

    def _emit(self, upto: int) -> str:
        out = self._text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return out
