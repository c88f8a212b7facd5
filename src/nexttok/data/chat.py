"""Records -> token ids and labels: render through the chat template, and mask what is not trained.

The mask never depends on ``{% generation %}`` markers in the template. Each assistant turn's
characters are found by rendering the conversation's prefixes: the text rendered for
``messages[:i]`` plus the generation prompt ends where turn ``i`` starts, and the text rendered for
``messages[:i+1]`` ends where it stops. Tokens whose characters start inside such a span are
trained; every other label is -100.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nexttok.data.formats import Record
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
TRAIN_ON = ("completion", "assistant", "all", "last")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
DEFAULT_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give a tokenizer without a chat template the default ChatML one, adding its two special tokens
    where missing. Returns how many tokens were added (the model's embeddings must grow by as many)."""
    if getattr(tokenizer, "chat_template", None):
        return 0
    tokenizer.chat_template = DEFAULT_CHATML
    return tokenizer.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})


@dataclass(frozen=True)
class Example:
    """One rendered record. ``labels[t]`` is the target at position t (not shifted; -100 = untrained);
    ``labels[0]`` is always -100 because nothing before it predicts it."""

    input_ids: list[int]
    labels: list[int]
    n_bytes: int
    where: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Rendered:
    """Examples ready for batching, with records dropped and why."""

    examples: list[Example]
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def summary(self) -> str:
        parts = [f"{len(self.examples):,} examples, {sum(e.n_trained for e in self.examples):,} trained tokens"]
        parts += [f"{self.truncated:,} truncated"] if self.truncated else []
        parts += [f"{n:,} dropped: {why}" for why, n in self.dropped.most_common()]
        return "; ".join(parts)


class Renderer:
    """Turns :class:`Record` objects into :class:`Example` objects for one tokenizer.

    ``train_on``: ``completion`` and ``assistant`` train every assistant turn (for a prompt/completion
    record that is the completion); ``last`` only the final assistant turn; ``all`` every token.
    ``None`` picks the default (``completion``). Text records always train every token.
    Records longer than ``max_length`` are dropped, or cut to it when ``truncate``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_on: str | None = None,
        max_length: int | None = None,
        truncate: bool = False,
    ):
        train_on = train_on or "completion"
        if train_on not in TRAIN_ON:
            raise NexttokError(f"--train-on must be one of {', '.join(TRAIN_ON)} (got '{train_on}')", "train_on")
        if max_length is not None and max_length < 2:
            raise NexttokError(f"--max-length must be at least 2 (got {max_length})", param="max_length")
        self.tokenizer, self.train_on, self.max_length, self.truncate = tokenizer, train_on, max_length, truncate

    def render(self, record: Record) -> Example:
        """Ids and labels of one record, at full length."""
        if record.is_chat:
            text, spans = self._chat_spans(record)
        else:
            eos = self.tokenizer.eos_token or ""
            text = record.text + eos
            spans = [(0, len(text))]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        trained = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]
        if labels:
            labels[0] = IGNORE
        n_bytes = sum(len(text[s:e].encode()) for (s, e), lab in zip(offsets, labels, strict=True) if lab != IGNORE)
        return Example(ids, labels, n_bytes, record.where)

    def render_all(self, records: list[Record]) -> Rendered:
        """Render every record; drop (or cut) the too long, drop those with no trained token."""
        out = Rendered([])
        for record in records:
            full = self.render(record)
            ex = self._sized(full)
            if ex is None:
                out.dropped[f"longer than {self.max_length} tokens"] += 1
            elif ex.n_trained == 0:
                out.dropped["no trained tokens"] += 1
            else:
                out.truncated += ex is not full
                out.examples.append(ex)
        if not out.examples:
            raise NexttokError(
                f"every record was dropped ({out.summary()}); check --train-on, --max-length or use --truncate",
                param="data",
            )
        return out

    def _sized(self, ex: Example) -> Example | None:
        """``ex`` if it fits in ``max_length``; cut to fit when ``truncate``; else None."""
        if self.max_length is None or len(ex) <= self.max_length:
            return ex
        return cut(ex, self.max_length) if self.truncate else None

    def _chat_spans(self, record: Record) -> tuple[str, list[tuple[int, int]]]:
        messages = list(record.messages)
        full = self._apply(messages, False)
        if self.train_on == "all":
            return full, [(0, len(full))]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = turns[-1:] if self.train_on == "last" else turns
        spans = []
        for i in turns:
            start = len(self._prefix(messages[:i], True, full, record))
            end = len(self._prefix(messages[: i + 1], False, full, record).rstrip())
            spans.append((start, end))
        return full, spans

    def _prefix(self, messages: list[dict], gen_prompt: bool, full: str, record: Record) -> str:
        text = self._apply(messages, gen_prompt) if messages else ""
        if not full.startswith(text):
            raise NexttokError(
                f"{record.where}: this chat template renders a conversation's beginning differently from the "
                "whole, so the assistant turns cannot be located; use --train-on all"
            )
        return text

    def _apply(self, messages: list[dict], gen_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def cut(ex: Example, n: int) -> Example:
    """The first ``n`` tokens of an example (bytes recounted approximately: trained share)."""
    labels = ex.labels[:n]
    kept = sum(label != IGNORE for label in labels)
    n_bytes = round(ex.n_bytes * kept / ex.n_trained) if ex.n_trained else 0
    return Example(ex.input_ids[:n], labels, n_bytes, ex.where)
