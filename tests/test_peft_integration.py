"""MoLE as a registered PEFT method: ``peft.get_peft_model`` / ``peft.PeftModel.from_pretrained``
build what ``get_mole_model`` / ``load_mole_model`` build, with the aux losses and routing
statistics; adapters saved before MoLE was a PEFT method still load."""

import json

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

import dynmole
from dynmole import MoLEConfig, get_mole_model, load_mole_model
from dynmole.config import setting_fields
from dynmole.errors import DynmoleError
from dynmole.model import MoLEModel, find_mole


def _config(method, **kwargs):
    return MoLEConfig(method=method, r=4, alpha=8, lambda_hidden=8, dropout=0.0, **kwargs)


def _batch():
    torch.manual_seed(7)
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids, mask


def _randomise(model, seed=123):
    """A non-trivial adapter (B starts at zero), the same for the same seed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.mole_layers():
            layer.lora_B.normal_(std=0.5)
            layer.router.normal_(std=0.3)


@pytest.mark.parametrize("method", dynmole.METHODS)
def test_peft_builds_and_loads_what_our_api_does(tiny_llama, tmp_path, method):
    ids, mask = _batch()
    torch.manual_seed(0)
    ours = get_mole_model(tiny_llama(), _config(method)).eval()
    torch.manual_seed(0)
    theirs = get_peft_model(tiny_llama(), _config(method)).eval()
    assert type(theirs) is type(ours) is peft.PeftModelForCausalLM and isinstance(theirs.base_model, MoLEModel)
    for model in (ours, theirs):
        _randomise(model)
    expected = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)

    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DYNMOLE" and saved["task_type"] == "CAUSAL_LM" and saved["format_version"] == 3
    assert (tmp_path / "README.md").read_text().startswith("---")  # PEFT's model card
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, MoLEConfig) and config.to_dict() == _config(method).to_dict()
    for loaded in (PeftModel.from_pretrained(tiny_llama(), tmp_path), load_mole_model(tiny_llama(), tmp_path)):
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    trainable = load_mole_model(tiny_llama(), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and names == {n for n, p in ours.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["dynmole", "ldmole", "remole"])
def test_peft_route_adds_the_aux_losses_and_collects_routing_stats(tiny_llama, method):
    ids, mask = _batch()
    model = get_peft_model(tiny_llama(), _config(method, balance_coef=0.5))
    _randomise(model)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    aux = model.last_aux_losses
    assert aux["total"] > 0.1  # the balance loss at coefficient 0.5 is about 0.5
    with find_mole(model).deferred_aux_loss():  # the LM loss alone (no dropout: the same forward)
        lm_loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(out.loss, lm_loss + aux["total"])
    out.loss.backward()
    assert all(layer.router.grad is not None for layer in model.mole_layers())
    if method == "remole":
        before = model.relu_l1_coef.item()
        model.update_remole_coefficient()
        assert model.relu_l1_coef.item() != before
    model.eval()
    with torch.no_grad(), model.collect_routing_stats() as stats:
        model(input_ids=ids, attention_mask=mask)
    summary = stats.summary()
    assert len(summary) == 6 and all(module["tokens"] == int(mask.sum()) for module in summary.values())


def test_disabled_adapter_gives_the_base_model(tiny_llama):
    ids, mask = _batch()
    expected = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    model = get_peft_model(tiny_llama(), _config("dynmole")).eval()
    _randomise(model)
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_one_adapter_per_model_and_no_merging(tiny_llama):
    model = get_peft_model(tiny_llama(), _config("dynmole"))
    with pytest.raises(DynmoleError, match="holds one adapter"):
        model.add_adapter("second", _config("mola"))
    assert list(model.peft_config) == ["default"]
    with pytest.raises(DynmoleError, match="cannot be merged"):
        model.merge_and_unload()


def test_peft_route_refuses_an_adapter_of_another_base_model(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    get_peft_model(tiny_llama(), _config("dynmole")).save_pretrained(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(DynmoleError, match=r"does not fit this base model: .*mlp\..*lora_A has shape"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("method", ["ldmole", "remole"])
def test_adapter_saved_before_peft_loads_and_converts(tiny_llama, tmp_path, method):
    """Format version 2: no PEFT fields, weights under the HF model's names (and the old wrapper's
    ``lambda_mlps.*`` / ``relu_l1_coef``). ``load_mole_model`` reads it; re-saving converts it."""
    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), _config(method)).eval()
    _randomise(model)
    if method == "remole":
        model.relu_l1_coef.fill_(0.25)
    expected = model(input_ids=ids, attention_mask=mask).logits
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = get_peft_model_state_dict(model)
    assert any(key.startswith(("base_model.lambda_mlps.", "base_model.relu_l1_coef")) for key in state)
    old_keys = {key.removeprefix("base_model.").removeprefix("model."): value.contiguous()
                for key, value in state.items() if key.startswith("base_model.")}
    save_file(old_keys, str(legacy / "adapter_model.safetensors"))
    (legacy / "adapter_config.json").write_text(json.dumps(
        {"adapter_type": "DYNMOLE", "format_version": 2, "base_model_name_or_path": None, "dynmole_version": "0.1.0",
         **_config(method).to_dict()}))

    restored = load_mole_model(tiny_llama(), legacy)
    torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    if method == "remole":
        assert restored.relu_l1_coef.item() == 0.25
    with pytest.raises(KeyError, match="peft_type"):  # PEFT alone cannot read it: re-save it
        PeftModel.from_pretrained(tiny_llama(), legacy)
    restored.save_pretrained(tmp_path / "converted")
    converted = PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted")
    torch.testing.assert_close(converted(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_config_is_a_peft_config_whose_settings_leave_peft_fields_out():
    config = MoLEConfig(method="mola", top_k=1)
    assert isinstance(config, PeftConfig) and config.peft_type == peft.PeftType.DYNMOLE == "DYNMOLE"
    assert config.task_type == "CAUSAL_LM"
    names = [f.name for f in setting_fields(MoLEConfig)]
    assert names[0] == "method" and set(config.to_dict()) == set(names)
    assert not {"peft_type", "task_type", "base_model_name_or_path", "inference_mode"} & set(names)
    with pytest.raises(DynmoleError, match="task_type must be CAUSAL_LM"):
        MoLEConfig(task_type="SEQ_CLS")


def test_command_line_options_leave_peft_fields_out(capsys):
    from dynmole import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    options = capsys.readouterr().out
    assert "--num-experts" in options and "--top-p" in options
    peft_fields = ("peft_type", "task_type", "inference_mode", "peft_version", "base_model_name_or_path")
    assert not any(f"--{name.replace('_', '-')}" in options for name in peft_fields)


def test_peft_loader_reads_our_markers_without_a_warning_and_checks_them(tiny_llama, tmp_path):
    """``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained`` pass the whole adapter_config.json
    to MoLEConfig (not through its ``check_kwargs``): our markers are taken without PEFT's "unexpected
    keyword arguments ... upgrade PEFT" warning, and a newer format is refused, as our own loader does."""
    import warnings

    get_peft_model(tiny_llama(), _config("dynmole")).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert isinstance(PeftConfig.from_pretrained(str(tmp_path)), MoLEConfig)
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99; this dynmole reads versions up to 3: upgrade dynmole"):
        PeftConfig.from_pretrained(str(tmp_path))
