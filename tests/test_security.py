"""Loading never unpickles: safetensors and JSON only, and torch.load only with weights_only=True."""

import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "dynmole"


def _python_files():
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 10
    return files


def test_no_pickle_and_safe_torch_load():
    for path in _python_files():
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|cPickle|dill", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "torch.save(" not in text, f"{path}: torch.save writes pickle"


def test_remote_code_off_by_default():
    from dynmole.experiments.job import JobConfig

    assert JobConfig().trust_remote_code is False
    text = (SOURCE / "pretrained.py").read_text()
    assert "trust_remote_code: bool = False" in text
