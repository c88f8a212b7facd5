"""OpenAI requests into nexttok's terms (token ids, a :class:`SamplingConfig`) and Steps into OpenAI's
logprob shapes. Every check here raises :class:`NexttokError` naming the field, which the app turns into a 400."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from nexttok.errors import NexttokError
from nexttok.sampling import SamplingConfig
from nexttok.server.schemas import UNSUPPORTED, Message, Sampling

if TYPE_CHECKING:
    from nexttok.lm import LM
    from nexttok.samples import Alternative, Step
    from nexttok.server.scheduler import PromptToken

# The sampling fields a request may leave out, and OpenAI's default for each.
DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
}  # fmt: skip
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    """What the server allows: ``max_logprobs`` alternatives per token (-1: the whole vocabulary), ``max_n``."""

    max_logprobs: int = 20
    max_n: int = 16


def refuse_unsupported(req: Sampling) -> None:
    for name in UNSUPPORTED:
        value = getattr(req, name)
        if name in req.model_fields_set and value is not None and not (name == "best_of" and value == 1):
            raise NexttokError(
                f"'{name}' is not supported by nexttok serve; remove it (nexttok never ignores a field)", param=name
            )


def generation_defaults(lm: LM) -> dict[str, Any]:
    """The sampling values the model's generation config sets explicitly (as vLLM reads them)."""
    config = getattr(lm.model, "generation_config", None)
    given = config.to_diff_dict() if config is not None else {}
    return {k: given[k] for k in DEFAULTS if given.get(k) is not None}


def sampling_config(lm: LM, req: Sampling, max_tokens: int, limits: Limits) -> tuple[SamplingConfig, dict[str, Any]]:
    """The request's :class:`SamplingConfig` (its checks and messages are the CLI's) and the effective
    settings to report: every sampling value, and where each came from."""
    refuse_unsupported(req)
    if not 1 <= req.n <= limits.max_n:
        raise NexttokError(f"n must be between 1 and {limits.max_n} (got {req.n}); the server's --max-n", param="n")
    model_defaults, values, source = generation_defaults(lm), {}, {}
    for name, default in DEFAULTS.items():
        given = getattr(req, name)
        if given is not None:
            values[name], source[name] = given, "request"
        elif name in model_defaults:
            values[name], source[name] = model_defaults[name], "generation_config"
        else:
            values[name], source[name] = default, "default"
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    bias: dict[str | int, float] = {int(k) if k.isdigit() else k: v for k, v in (req.logit_bias or {}).items()}
    config = SamplingConfig(
        **values, logit_bias=bias, max_new_tokens=max(1, max_tokens), stop=tuple(stop), seed=req.seed,
        ignore_eos=req.nexttok.ignore_eos,
    )  # fmt: skip
    effective = {**values, "logit_bias": req.logit_bias or {}, "stop": stop, "seed": req.seed, "n": req.n}
    effective.update(max_tokens=max_tokens, ignore_eos=req.nexttok.ignore_eos, greedy=config.greedy)
    return config, {"sampling": effective, "sampling_source": source}


def check_logprobs(k: int | None, lm: LM, limits: Limits, param: str = "logprobs") -> int:
    """Alternatives per token asked for: 0 when none; -1 (the whole vocabulary) where the server allows it."""
    if k is None:
        return 0
    if k == -1 and limits.max_logprobs == -1:
        return lm.vocab_size
    cap = lm.vocab_size if limits.max_logprobs == -1 else limits.max_logprobs
    if not 0 <= k <= cap:
        hint = (
            "-1 (the whole vocabulary) needs a server started with --max-logprobs -1"
            if k == -1
            else (f"ask for at most {cap}, or start the server with a higher --max-logprobs")
        )
        raise NexttokError(f"{param} must be between 0 and {cap} (got {k}); {hint}", param=param)
    return k


def prompt_ids(lm: LM, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return lm.encode(prompt)
    if not prompt:
        raise NexttokError("a prompt of token ids is empty; give at least one id", param="prompt")
    bad = [i for i in prompt if not 0 <= i < lm.vocab_size]
    if bad:
        raise NexttokError(f"token id {bad[0]} is outside the vocabulary (0..{lm.vocab_size - 1})", param="prompt")
    limit = lm.context_length
    if limit is not None and len(prompt) > limit:
        raise NexttokError(f"the prompt is {len(prompt)} tokens but the model's context is {limit}", param="prompt")
    return list(prompt)


def prompts(lm: LM, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Each prompt of a completions request as ids: a string, strings, ids, or lists of ids."""
    if isinstance(prompt, str):
        return [prompt_ids(lm, prompt)]
    if not prompt:
        raise NexttokError("prompt is an empty list; give a string, strings, token ids or lists of ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt_ids(lm, prompt)]
    return [prompt_ids(lm, p) for p in prompt]


def chat_ids(lm: LM, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    if not messages:
        raise NexttokError("messages is empty; give at least one message", param="messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise NexttokError(
                f"messages[{i}].role {m.role!r} is not one this server renders; use one of {', '.join(ROLES)}",
                param=f"messages[{i}].role",
            )
        if m.content is None:
            raise NexttokError(f"messages[{i}].content is missing; give its text", param=f"messages[{i}].content")
    rendered = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return lm.encode_chat(rendered, add_generation_prompt=add_generation_prompt)
    except NexttokError as e:
        raise NexttokError(str(e).replace("drop --chat", "use /v1/completions"), param="messages") from None
    except Exception as e:  # the template's own refusal (jinja raise_exception, a missing key, ...)
        raise NexttokError(f"the model's chat template cannot render these messages: {e}", param="messages") from None


def request_ids(lm: LM, req, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a request that gives exactly one of ``prompt`` (text), ``messages`` or ``ids`` (as its
    schema has them)."""
    fields = [f for f in ("prompt", "messages", "ids") if f in type(req).model_fields]
    given = [f for f in fields if getattr(req, f) is not None]
    if len(given) != 1:
        raise NexttokError(f"give exactly one of {', '.join(fields[:-1])} and {fields[-1]}", param="prompt")
    if given[0] == "ids":
        return prompt_ids(lm, req.ids)
    if given[0] == "messages":
        return chat_ids(lm, req.messages, add_generation_prompt)
    return lm.encode(req.prompt)


def max_new(lm: LM, asked: int | None, n_prompt: int, zero_ok: bool) -> int:
    """The request's new-token budget: ``asked`` (None: what the context leaves), checked against the context."""
    left = None if lm.context_length is None else lm.context_length - n_prompt
    if asked is None:
        if left is not None and left < 1:
            raise NexttokError(f"the prompt fills the model's context of {lm.context_length}", param="messages")
        return left if left is not None else 256
    if asked < (0 if zero_ok else 1):
        hint = "0 is allowed only with echo (scoring the prompt)" if not zero_ok else ""
        raise NexttokError(f"max_tokens must be at least {0 if zero_ok else 1} (got {asked}); {hint}", "max_tokens")
    if left is not None and asked > left:
        raise NexttokError(
            f"max_tokens is {asked} but the prompt is {n_prompt} tokens of the model's context of {lm.context_length}: "
            f"at most {left} new tokens fit; lower max_tokens or shorten the prompt",
            param="max_tokens",
        )
    return asked


# --- Steps into OpenAI's shapes -------------------------------------------------------------------------


def offsets(lm: LM, ids: list[int], start: int = 0) -> list[int]:
    """Each token's character offset in the text of ``ids`` (plus ``start``): the decoded prefixes' lengths."""
    decode = lm.tokenizer.decode
    return [start + len(decode(ids[:i])) for i in range(len(ids))]


def token_extension(step: Step) -> dict[str, Any]:
    """What nexttok adds per generated token: rank, entropy, the draw, the alternatives by id (with
    ``logprobs``) and, traced, each stage."""
    out = {
        "id": step.id, "rank": step.rank, "entropy": step.entropy, "prob": step.prob,
        "sampled_prob": step.sampled_prob, "uniform": step.uniform,
    }  # fmt: skip
    if step.alternatives:
        out["alternatives"] = [{"id": a.id, "text": a.text, "prob": a.prob} for a in step.alternatives]
    if step.stages is not None:
        out["stages"] = [asdict(r) for r in step.stages]
    return out


def legacy_top(alts: list[Alternative]) -> dict[str, float]:
    return {a.text: a.logprob for a in alts}


def chat_logprob(lm: LM, token: int, text: str, logprob: float, alts: list[Alternative]) -> dict[str, Any]:
    return {
        "token": text, "logprob": logprob, "bytes": list(lm.token_bytes(token)),
        "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(lm.token_bytes(a.id))} for a in alts],
    }  # fmt: skip


def prompt_entries(lm: LM, scored: list[PromptToken]) -> list[dict[str, Any]]:
    """The prompt's tokens for ``nexttok.prompt_logprobs``: each with its logprob and alternatives."""
    return [
        {"id": t.id, "token": lm.token_text(t.id), "logprob": t.logprob,
         "top_logprobs": [{"id": i, "token": lm.token_text(i), "logprob": lp} for i, lp in t.top]}
        for t in scored
    ]  # fmt: skip


def finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")
