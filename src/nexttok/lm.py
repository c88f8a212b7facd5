"""``LM``: a causal LM with its tokenizer. Text becomes ids here, at the edge; the rest speaks ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nexttok import gc_pause
from nexttok.bytelevel import byte_decoder
from nexttok.distribution import Distribution
from nexttok.errors import NexttokError
from nexttok.models import ModelSource, load_model_and_tokenizer, quiet_transformers
from nexttok.weights import WeightCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class LM:
    """A loaded causal language model and its tokenizer.

    >>> lm = nexttok.load()                      # the packaged default model
    >>> d = lm.distribution("The capital of France is")
    >>> d.top(3)[0].text
    ' Paris'

    A Hugging Face model and tokenizer already in memory are wrapped as they are: ``nexttok.LM(model,
    tokenizer)``. nexttok then never changes that model: the copies it makes for speed live in
    ``lm.weights`` (:class:`nexttok.weights.WeightCache`) and go with the LM. ``owns_model`` (as
    :func:`load` sets it) lets nexttok move the model's parameters onto huge pages for a long decode.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        source: ModelSource | None = None,
        owns_model: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source or ModelSource("memory", type(model).__name__)
        self.weights = WeightCache(model, owns_model)
        self._texts: dict[int, str] = {}  # token_text's answers: a generate step asks for 4+ per token

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # --- text <-> ids, at the edge ---------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of ``prompt``; ``chat`` renders it as a user message with the chat template.
        An empty prompt becomes the BOS token where the tokenizer has one."""
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise NexttokError(
                    "the prompt is empty and this tokenizer has no BOS token to start from; give some text",
                    param="prompt",
                )
            ids = [bos]
        self._check_length(ids)
        return ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise NexttokError(
                "this model's tokenizer has no chat template; drop --chat, or use an instruct/chat model",
                param="chat",
            )
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self._check_length(ids)
        return ids

    def _check_length(self, ids: list[int]) -> None:
        n = self.context_length
        if n is not None and len(ids) > n:
            raise NexttokError(
                f"the prompt is {len(ids)} tokens but the model's context is {n}; shorten the prompt",
                param="prompt",
            )

    def token_text(self, token_id: int) -> str:
        """The text of one token; a piece of a multi-byte character shows its bytes (``\\xe2``)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._token_text(token_id)
        return text

    def _token_text(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        dec = byte_decoder()
        if isinstance(raw, str) and raw and all(c in dec for c in raw):
            return "".join(f"\\x{dec[c]:02x}" for c in raw)
        return raw if isinstance(raw, str) else text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a multi-byte character is its bytes alone)."""
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        dec = byte_decoder()
        if isinstance(raw, str) and raw and all(c in dec for c in raw):  # byte-level BPE
            return bytes(dec[c] for c in raw)
        if isinstance(raw, str) and len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):  # byte fallback
            return bytes([int(raw[3:5], 16)])
        return text.encode("utf-8")

    def token_ids(self, token: str | int) -> list[int]:
        """The ids of a token given as an id or as text (several ids for a word of several tokens)."""
        if isinstance(token, int):
            if not 0 <= token < self.vocab_size:
                raise NexttokError(
                    f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})", param="token"
                )
            return [token]
        ids = self.tokenizer.encode(token, add_special_tokens=False) if token else []
        unk = self.tokenizer.unk_token_id
        if not ids or (unk is not None and unk in ids and self.tokenizer.unk_token not in token):
            raise NexttokError(
                f"the tokenizer cannot encode the token text {token!r}; give text it knows, or an id",
                param="token",
            )
        return ids

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # --- the model, on ids -------------------------------------------------------------------------

    @torch.inference_mode()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        """Raw scores for the token after ``ids``, shape (V,). Only the last position goes through
        the output layer: the other positions' logits are never computed."""
        input_ids = torch.tensor([ids], device=self.model.device)  # (1, T)
        # On a GPU the scores come back to the CPU: the distribution, processors and seeded sampling
        # run there, so a seed draws the same tokens on every device.
        return self._fast()(input_ids=input_ids, logits_to_keep=1, use_cache=False).logits[0, -1].cpu()

    @torch.inference_mode()
    def continuation_logprob(self, prefix: list[int], continuation: list[int], temperature: float = 1.0) -> float:
        """log P(continuation | prefix) by the chain rule, in one forward pass."""
        n = len(continuation)
        input_ids = torch.tensor([prefix + continuation[:-1]], device=self.model.device)  # (1, T)
        logits = self._fast()(input_ids=input_ids, logits_to_keep=n, use_cache=False).logits[0]  # (n, V)
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        return float(logprobs.gather(1, torch.tensor(continuation, device=logprobs.device).unsqueeze(1)).sum())

    def _fast(self) -> PreTrainedModel:
        """The model with faster kernels per call shape on the CPU (:func:`nexttok.torchdecode.inference_copy`)."""
        return self.weights.inference_model() if self.model.device.type == "cpu" else self.model

    def distribution(self, prompt: str | list[int], chat: bool = False, temperature: float = 1.0) -> Distribution:
        """The next-token :class:`Distribution` for ``prompt`` (text, or token ids)."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        return Distribution(self.last_logits(ids), self, ids, temperature)


def load(model: str | None = None, dtype: str = "float32", threads: int | None = None, device: str | None = None) -> LM:
    """Load a model: ``default`` (or ``None``: ``$NEXTTOK_MODEL``, else the packaged SmolLM2-135M-Instruct),
    a local HF folder, a ``.gguf`` file, or a hub id (online only); onto ``device`` (``auto``, the default:
    the CUDA GPU when torch sees one, else the CPU; or ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    # ~400,000 new objects: no collections while they arrive; transformers quiet only meanwhile.
    with gc_pause.paused(freeze=gc_pause.freeze_after_load), quiet_transformers():
        lm = LM(*load_model_and_tokenizer(model, dtype=dtype, threads=threads, device=device), owns_model=True)
    gc_pause.freeze_at_exit()
    return lm
