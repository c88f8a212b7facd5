"""Model resolution: one place decides default / folder / .gguf / hub id, with clear errors; the
default model's converted cache is detected when partial or corrupt and rebuilt."""

import json
import shutil

import pytest

import nexttok
from nexttok import models
from nexttok.errors import NexttokError


def test_resolve_kinds(tiny_model_dir, tmp_path, monkeypatch):
    assert models.resolve("default").kind == "default"
    assert models.resolve(None).kind == "default"
    assert models.resolve(str(tiny_model_dir)) == models.ModelSource("folder", str(tiny_model_dir))
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve(str(gguf)) == models.ModelSource("gguf", str(tmp_path), "m.gguf")
    monkeypatch.setenv("NEXTTOK_MODEL", str(tiny_model_dir))
    assert models.resolve(None).kind == "folder"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p / "./a/b/c", "does not exist"),
        (lambda p: "models/missing.gguf", "does not exist"),
        (lambda p: (p / "d").mkdir() or p / "d", "not a model folder"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "neither a model folder nor a .gguf"),
    ],
)
def test_resolve_errors(tmp_path, make, message):
    with pytest.raises(NexttokError, match=message):
        models.resolve(str(make(tmp_path)))


def test_hub_offline_is_one_clear_error_at_once():
    import time

    start = time.monotonic()
    with pytest.raises(NexttokError, match="'nobody-here/no-such-model' is not a local path.*--model default"):
        nexttok.load("nobody-here/no-such-model")
    # huggingface_hub alone retries for about a minute before giving up offline
    assert time.monotonic() - start < 20


def test_broken_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NexttokError, match="could not load"):
        nexttok.load(str(tmp_path))


def test_dtype_bfloat16(tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setenv("NEXTTOK_BF16", "fast")  # where bf16 is emulated load() runs float32 (test_precision)
    lm = nexttok.load(str(tiny_model_dir), dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    assert abs(float(lm.distribution("the king").probs.sum()) - 1) < 1e-5


def test_partial_cache_is_not_complete(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert not models._cache_complete(folder)  # no marker: the conversion never finished
    (folder / models.MARKER).write_text(json.dumps({"files": {"model.safetensors": 100}}))
    assert models._cache_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    assert not models._cache_complete(folder)
    (folder / models.MARKER).write_text("{")  # marker itself cut short
    assert not models._cache_complete(folder)


@pytest.mark.integration
def test_corrupt_default_cache_is_rebuilt(default_lm, tmp_path, monkeypatch):
    """Bytes damaged in place (same size): loading fails once, the cache is rebuilt, and it works."""
    real = models.default_cache()
    monkeypatch.setenv("NEXTTOK_CACHE", str(tmp_path))
    folder = models.default_cache()
    assert folder != real
    shutil.copytree(real, folder)
    with (folder / "model.safetensors").open("r+b") as f:
        f.write(b"\xff" * 64)  # clobber the safetensors header
    assert models._cache_complete(folder)
    lm = nexttok.load("default")
    assert lm.distribution("The capital of France is").top(1)[0].text == " Paris"
    assert models._cache_complete(folder)


@pytest.mark.integration
def test_gguf_file_loads_directly():
    from nexttok.assets import default_gguf

    lm = nexttok.load(str(default_gguf()))
    assert lm.source.kind == "gguf"
    assert lm.distribution("The capital of France is").top(1)[0].text == " Paris"


def test_load_freezes_the_collector_at_exit_only(tiny_model_dir):
    """A library user's import and load() freeze nothing while the process runs; at exit, load() leaves the
    final collections nothing to walk (the console script also freezes after its imports and the load)."""
    import subprocess
    import sys

    code = (
        "import atexit, gc\n"
        "before = gc.get_freeze_count()\n"
        "import nexttok\n"
        "imported = gc.get_freeze_count()\n"
        f"lm = nexttok.load({str(tiny_model_dir)!r})\n"
        "loaded = gc.get_freeze_count()\n"
        "atexit._run_exitfuncs()\n"
        "print(imported == before, loaded == imported, gc.get_freeze_count() > loaded + 10000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]


def test_import_and_load_pause_the_collector_and_restore_it(tiny_model_dir):
    """Start-up runs (almost) no collections (see gc_pause.py; ~900 ran before) and hands the collector back as
    the caller had it."""
    import subprocess
    import sys

    code = (
        "import atexit, collections.abc, contextlib, functools, gc, sys\n"  # what gc_pause.py needs before it pauses
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: runs.append(1) if phase == 'start' else None)\n"
        "if sys.argv[2] == 'off': gc.disable()\n"
        "import nexttok\n"
        "after_import = len(runs)\n"
        "lm = nexttok.load(sys.argv[1])\n"
        # Loading the package's own code comes before the pause can start; after load, one young-generation pass.
        "print(after_import <= 2, len(runs) - after_import <= 1, gc.isenabled())\n"
    )
    for state, enabled in (("on", "True"), ("off", "False")):
        out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), state], capture_output=True, text=True)
        assert out.stdout.split() == ["True", "True", enabled], out.stderr


def test_paused_freezes_on_request_and_restores_on_error():
    import gc

    from nexttok import gc_pause

    before = gc.get_freeze_count()
    try:
        with gc_pause.paused(freeze=True):
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]  # noqa: F841 (alive at the end of the block: frozen)
            raise KeyError("boom")
    except KeyError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() >= before + 1000
    gc.unfreeze()  # give this test process its usual collector back


def test_console_script_setting_freezes_after_load(tiny_model_dir):
    """What cli.main() turns on: the loaded model's objects move to the permanent generation."""
    import subprocess
    import sys

    code = (
        "import gc, sys, nexttok\n"
        "from nexttok import gc_pause, cli\n"
        "gc_pause.freeze_after_load = True\n"
        "before = gc.get_freeze_count()\n"
        "lm = nexttok.load(sys.argv[1])\n"
        "print(gc.get_freeze_count() > before + 1000, gc.isenabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
