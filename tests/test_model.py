import json

import pytest
import torch

import dynmole
from dynmole import MoLEConfig, get_mole_model, load_mole_model
from dynmole.errors import DynmoleError
from dynmole.layers import MoLELinear

METHODS = list(dynmole.METHODS)


def _randomise_adapter(model, router_std=1.0):
    """Make the adapter non-trivial (B starts at zero)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for layer in model.mole_layers():
            layer.lora_B.normal_(std=0.5)
            layer.router.normal_(std=router_std)


def _batch(vocab=96):
    torch.manual_seed(7)
    ids = torch.randint(0, vocab, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_equals_base(tiny_llama, method):
    ids, mask = _batch()
    expected = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    model = get_mole_model(tiny_llama(), MoLEConfig(method=method, r=4, alpha=8))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tiny_llama, tmp_path, method):
    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), MoLEConfig(method=method, r=4, alpha=8, lambda_hidden=8)).eval()
    _randomise_adapter(model)
    expected = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(expected, tiny_llama()(input_ids=ids, attention_mask=mask).logits)
    model.save_pretrained(tmp_path)
    # PEFT's files: the model card, the config, the weights
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == method and saved["adapter_type"] == "DYNMOLE" and saved["peft_type"] == "DYNMOLE"
    # adapter weights only: far smaller than the base model
    base_bytes = sum(p.numel() * 4 for p in tiny_llama().parameters())
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < base_bytes
    restored = load_mole_model(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_adapter_only(tiny_llama, method):
    ids, mask = _batch()
    # lambda_bias_init=None: the reference's -2.5 bias leaves a tiny model's lambda-MLP hidden units
    # all inactive at init (only fc2's bias learns then), see test_ldmole_reference_lambda_init
    config = MoLEConfig(method=method, r=4, alpha=8, lambda_hidden=8, dropout=0.0, lambda_bias_init=None)
    model = get_mole_model(tiny_llama(), config)
    # a router of std 1 gives Sparsegen one expert per token, where neither the gates nor LD-MoLE's
    # balance loss (hard counts x mean gate) depend on the router: no gradient, as in the reference
    _randomise_adapter(model, router_std=0.1 if method == "ldmole" else 1.0)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names, "nothing trainable"
    for name, param in model.named_parameters():
        if name in names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    assert {"lora_A", "lora_B", "router"} <= kinds
    if method == "ldmole":
        assert any(n.startswith("base_model.lambda_mlps.") for n in names)
    base_names = {n for n, _ in tiny_llama().named_parameters()}
    assert not names & {f"base_model.model.{n}" for n in base_names}
    assert not any(".base_layer." in n for n in names)


def test_aux_loss_added_and_reported(tiny_llama):
    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4, alpha=8))
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    plain = tiny_llama().train()(input_ids=ids, attention_mask=mask, labels=ids).loss
    aux = model.last_aux_losses
    assert set(aux) >= {"balance", "entropy", "total"}
    torch.testing.assert_close(out.loss, plain + aux["total"], rtol=1e-5, atol=1e-6)
    # six modules (3 targets x 2 layers), uniform-ish router: entropy close to 1 -> loss close to beta
    assert 0.005 < aux["entropy"].item() <= 0.01 + 1e-6


def test_aux_loss_takes_the_lm_losses_share_of_num_items_in_batch(tiny_llama):
    """With ``num_items_in_batch`` (the step's answer tokens, HF's loss kwarg) the aux loss is
    weighted by this micro-batch's share of them, as the LM loss is (its sum over the micro-batch's
    tokens divided by the step's count); the share counts ``labels[..., 1:]`` or ``shift_labels``."""
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    count = int(labels[:, 1:].ne(-100).sum())
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4, alpha=8, dropout=0.0)).train()
    plain = tiny_llama().train()
    for items in (torch.tensor(3 * count), 3 * count):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
        lm = plain(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
        torch.testing.assert_close(out.loss, lm + model.last_aux_losses["total"] / 3, rtol=1e-5, atol=1e-6)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[0, :2] = -100  # shift_labels, when given, are what the loss sums (2 tokens fewer)
    kwargs = {"labels": labels, "shift_labels": shifted, "num_items_in_batch": torch.tensor(2 * count)}
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    lm = plain(input_ids=ids, attention_mask=mask, **kwargs).loss
    share = (count - 2) / (2 * count)
    torch.testing.assert_close(out.loss, lm + model.last_aux_losses["total"] * share, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_keeps_router_gradients(tiny_llama):
    ids, mask = _batch()
    grads = []
    for checkpointing in (False, True):
        model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4, alpha=8, dropout=0.0))
        _randomise_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(torch.cat([layer.router.grad.flatten() for layer in model.mole_layers()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_generate_with_kv_cache_matches_no_cache(tiny_llama):
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4, alpha=8)).eval()
    _randomise_adapter(model)
    prompt = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached)


def test_layerwise_expert_counts(tiny_llama):
    model = get_mole_model(tiny_llama(layers=4), MoLEConfig(method="mola", num_experts="2-4-6-8", top_k=2, r=2))
    counts = {}
    for layer in model.mole_layers():
        counts.setdefault(int(layer.name.split(".")[2]), set()).add(layer.num_experts)
    assert counts == {0: {2}, 1: {4}, 2: {6}, 3: {8}}
    listed = get_mole_model(tiny_llama(), MoLEConfig(method="loramoe", num_experts=[3, 5], r=2))
    assert sorted({layer.num_experts for layer in listed.mole_layers()}) == [3, 5]
    # more groups than layers would leave groups out (here 4 and 8): refused, naming num_experts
    with pytest.raises(DynmoleError, match="num_experts '2-4-6-8' has 4 layer groups but the model has 2 layer"):
        get_mole_model(tiny_llama(layers=2), MoLEConfig(method="mola", num_experts="2-4-6-8", top_k=2, r=2))


def test_local_lambda_mlps(tiny_llama):
    shared = get_mole_model(tiny_llama(), MoLEConfig(method="ldmole", lambda_hidden=8))
    local = get_mole_model(tiny_llama(), MoLEConfig(method="ldmole", lambda_hidden=8, lambda_shared=False))
    assert len(shared.lambda_mlps) == 2  # one per input width (hidden 32, intermediate 48)
    assert len(local.lambda_mlps) == 0
    assert sum(hasattr(layer, "lambda_mlp") for layer in local.mole_layers()) == 6


def test_routing_stats(tiny_llama):
    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4, alpha=8)).eval()
    _randomise_adapter(model)
    with torch.no_grad(), model.collect_routing_stats() as stats:
        model(input_ids=ids, attention_mask=mask)
    summary = stats.summary()
    assert len(summary) == 6
    for module in summary.values():
        assert module["tokens"] == int(mask.sum())
        assert 2 <= module["mean_experts"] <= 6
        assert 0 <= module["entropy"] <= 1 and 0 <= module["soft_fraction"] <= 1
        assert sum(module["load"]) == pytest.approx(1.0)
        assert sum(module["experts_histogram"]) == int(mask.sum())
    # stats are off by default: a plain forward records nothing
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert summary == stats.summary()


def test_trainable_parameters_reported(tiny_llama, capsys):
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4, num_experts=6))
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer: gate/up (32 -> 48) and down (48 -> 32): A + B + router
    per_layer = 2 * (6 * 4 * 32 + 48 * 6 * 4 + 6 * 32) + (6 * 4 * 48 + 32 * 6 * 4 + 6 * 48)
    assert trainable == 2 * per_layer
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"q": 0}, "q must be > 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"keep_top_k": 7}, "keep_top_k must be in"),
        ({"method": "mola", "top_k": 7}, "top_k must be in"),
        ({"threshold": 1.2}, r"threshold must be in \[0, 1\]"),
        ({"top_p_mode": "nucleus"}, "top_p_mode must be .paper. or .reference."),
        ({"r": 0}, "rank r must be >= 1"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha": -16}, "alpha must be > 0"),
        ({"method": "moe"}, "unknown method 'moe'"),
        ({"num_experts": "2-x"}, "must look like"),
        # a None (or another type) where a plain value is needed is refused when built, not after training
        ({"threshold": None}, r"^threshold must be a number, got None$"),
        ({"top_p": None}, r"^top_p must be a number, got None$"),
        ({"q": "1.1"}, r"^q must be a number, got '1.1'$"),
        ({"r": 4.0}, r"^r must be an integer, got 4.0$"),
        ({"soft_routing": 1}, r"^soft_routing must be true or false, got 1$"),
        ({"alpha": True}, r"^alpha must be a number, got True$"),
        ({"balance_coef": "x"}, r"^balance_coef must be a number or unset \(None\), got 'x'$"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(DynmoleError, match=message):
        MoLEConfig(**kwargs)


def test_missing_target_module_names_existing(tiny_llama):
    with pytest.raises(ValueError, match=r"not found in the model; its linear modules are: .*q_proj"):
        get_mole_model(tiny_llama(), MoLEConfig(target_modules=["c_fc"]))


def test_load_rejects_mismatched_and_corrupt_adapters(tiny_llama, tmp_path):
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4))
    model.save_pretrained(tmp_path / "a")
    # another base model shape
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not fit this base model"):
        load_mole_model(other, tmp_path / "a")
    # truncated weights
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_mole_model(tiny_llama(), tmp_path / "a")
    # newer format
    model.save_pretrained(tmp_path / "b")
    config_path = tmp_path / "b" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ValueError, match="upgrade dynmole"):
        load_mole_model(tiny_llama(), tmp_path / "b")
    config_path.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="PEFT adapter"):
        load_mole_model(tiny_llama(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a dynmole adapter folder|dynmole adapter folder"):
        load_mole_model(tiny_llama(), tmp_path / "missing")


def test_inference_mode_and_isinstance(tiny_llama):
    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), MoLEConfig(method="ldmole", lambda_hidden=8)).eval()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 9, 96)
    assert all(isinstance(m, MoLELinear) for m in model.mole_layers())
    assert model.config.vocab_size == 96  # attribute forwarded to the base model


def test_new_layers_take_the_wrapped_models_mode_and_loading_gives_eval(tiny_llama, tmp_path):
    ids, mask = _batch()
    config = MoLEConfig(method="dynmole", r=4, alpha=8, dropout=0.5)
    model = get_mole_model(tiny_llama(), config)  # from an eval-mode model (as from_pretrained gives)
    assert not any(m.training for m in model.modules())
    _randomise_adapter(model)
    first = model(input_ids=ids, attention_mask=mask, labels=ids)  # grad enabled, eval mode
    second = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)  # adapter dropout off
    assert model.last_aux_losses == {}  # no aux losses outside training
    training = get_mole_model(tiny_llama().train(), config)
    assert all(m.training for m in training.modules())
    model.save_pretrained(tmp_path)
    restored = load_mole_model(tiny_llama().train(), tmp_path)
    assert not any(m.training for m in restored.modules())
    out = restored(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, first.logits, rtol=0, atol=0)
    assert restored.last_aux_losses == {}


def test_old_adapter_config_loads_with_the_behaviour_it_was_trained_with(tiny_llama, tmp_path):
    model = get_mole_model(tiny_llama(), MoLEConfig(method="ldmole", r=4, lambda_hidden=8))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["format_version"] == 3 and data["entropy_eps"] == 1e-5
    for key in ("entropy_eps", "balance_pooling", "router_dropout", "lambda_bias_init"):
        del data[key]
    path.write_text(json.dumps({**data, "format_version": 1, "balance_coef": 0.001, "balance_mode": "soft",
                                "router_init_std": 0.02}))
    config = load_mole_model(tiny_llama(), tmp_path).mole_config
    assert config.entropy_eps == 0.0 and config.balance_pooling == "module"
    assert config.router_dropout is False and config.lambda_bias_init is None
    assert config.balance_weight == 1e-3 and config.balance_rule == "soft" and config.router_init == 0.02


def test_adapter_config_carries_and_requires_every_field(tiny_llama, tmp_path):
    model = get_mole_model(tiny_llama(), MoLEConfig(method="mola", r=4, alpha=8, top_k=1))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert set(MoLEConfig().to_dict()) <= set(data)
    del data["method"], data["alpha"]  # defaults would give a DynMoLE adapter with scaling 48 / 4
    path.write_text(json.dumps(data))
    with pytest.raises(DynmoleError, match=r"adapter_config.json lacks the adapter field\(s\) method, alpha;"):
        load_mole_model(tiny_llama(), tmp_path)


def test_router_init_follows_the_method_reference(tiny_llama):
    bound = 1 / 32**0.5  # kaiming-uniform (a = sqrt(5)) on the hidden width 32
    for method in ("dynmole", "loramoe", "mola", "topp", "ldmole"):
        model = get_mole_model(tiny_llama(), MoLEConfig(method=method, r=2, lambda_hidden=8))
        router = next(model.mole_layers()).router
        assert router.abs().max() <= bound and router.std() > 0.7 * bound / 3**0.5, method
    remole = next(get_mole_model(tiny_llama(), MoLEConfig(method="remole", r=2)).mole_layers()).router
    assert remole.std() < 0.03
    explicit = get_mole_model(tiny_llama(), MoLEConfig(method="loramoe", r=2, router_init_std=0.3))
    assert next(explicit.mole_layers()).router.std() > 0.2


def test_ldmole_reference_lambda_init(tiny_llama):
    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), MoLEConfig(method="ldmole", r=2, lambda_hidden=8))
    for mlp in model.lambda_mlps.values():
        assert (mlp.fc1.bias == -2.5).all() and (mlp.fc2.bias == -2.5).all()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert "balance" in model.last_aux_losses  # LD-MoLE's own balance loss, coefficient 1
    # initial lambda about logsigmoid(-2.5) + 0.99 = -1.6 (nn.Linear's default init gives about 0.25)
    model.recorder.active = True  # what a training forward records, without the losses
    with torch.no_grad():
        model.get_base_model()(input_ids=ids, attention_mask=mask)
    model.recorder.active = False
    lam = torch.cat([record.route.lam.flatten() for record in model.recorder.take()])
    assert -1.8 < lam.mean().item() < -1.4


def _remole_model(tiny_llama, **kwargs):
    config = MoLEConfig(method="remole", r=4, alpha=8, dropout=0.0, relu_target_k=2.0, relu_l1_init=1e-3, **kwargs)
    return get_mole_model(tiny_llama(), config).train()


def test_remole_coefficient_updates_once_per_optimizer_step(tiny_llama):
    ids, mask = _batch()
    model = _remole_model(tiny_llama)
    initial = model.relu_l1_coef.clone()
    active = []
    for _ in range(3):  # three micro-batches of one optimizer step
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        active.append(model.last_aux_losses["active_experts"])
        torch.testing.assert_close(model.relu_l1_coef, initial, rtol=0, atol=0)
    model.update_remole_coefficient()
    mean = torch.stack(active).mean()
    expected = initial * 1.2 ** torch.sign(mean - 2.0)
    torch.testing.assert_close(model.relu_l1_coef, expected, rtol=1e-6, atol=0)
    model.update_remole_coefficient()  # nothing ran since: unchanged
    torch.testing.assert_close(model.relu_l1_coef, expected, rtol=0, atol=0)
    get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=2)).update_remole_coefficient()  # a no-op


def test_remole_coefficient_all_reduces_the_statistic(tiny_llama, monkeypatch):
    import dynmole.model as model_module

    ids, mask = _batch()
    model = _remole_model(tiny_llama)
    model(input_ids=ids, attention_mask=mask, labels=ids)
    local = model.last_aux_losses["active_experts"]
    initial = model.relu_l1_coef.clone()

    class TwoRanks:  # the other rank ran 3 micro-batches with no active expert at all
        @staticmethod
        def is_available():
            return True

        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def get_world_size():
            return 2

        @staticmethod
        def all_reduce(tensor):
            tensor.add_(torch.tensor([0.0, 3.0]))

    monkeypatch.setattr(model_module, "dist", TwoRanks)
    model.update_remole_coefficient()
    expected = initial * 1.2 ** torch.sign(local / 4 - 2.0)  # the mean over both ranks' 4 micro-batches
    torch.testing.assert_close(model.relu_l1_coef, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["dynmole", "ldmole", "remole"])
def test_tuple_outputs_carry_the_aux_loss_as_dict_outputs_do(tiny_llama, method):
    """``return_dict=False`` (callers that ask for tuples) gets the same loss, aux losses included, and
    the same gradients as ``return_dict=True``."""
    ids, mask = _batch()
    results = []
    for return_dict in (True, False):
        model = get_mole_model(tiny_llama(), MoLEConfig(method=method, r=4, alpha=8, dropout=0.0, lambda_hidden=8))
        _randomise_adapter(model, router_std=0.2)
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids, return_dict=return_dict)
        loss = out.loss if return_dict else out[0]
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), model.last_aux_losses["total"], grads))
    (dict_loss, aux, dict_grads), (tuple_loss, _, tuple_grads) = results
    assert aux > 0
    torch.testing.assert_close(tuple_loss, dict_loss, rtol=0, atol=0)
    assert tuple_grads.keys() == dict_grads.keys()
    for name, grad in dict_grads.items():
        torch.testing.assert_close(tuple_grads[name], grad, rtol=0, atol=0, msg=name)


def test_pickled_adapter_weights_are_refused_with_how_to_resave_them(tiny_llama, tmp_path):
    """An adapter saved with ``safe_serialization=False`` is one (PEFT loads it); dynmole refuses the
    pickle in one line that says so and how to re-save it, not that the folder is no adapter."""
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(DynmoleError) as error:
        load_mole_model(tiny_llama(), tmp_path)
    message = str(error.value)
    assert "\n" not in message and "adapter_model.bin" in message and "safe_serialization=False" in message
    assert "save_pretrained(new_folder)" in message and "is not" not in message


def test_data_parallel_replicas_are_refused_in_one_line(tiny_llama):
    """``torch.nn.DataParallel`` runs shallow copies marked ``_is_replica``: their aux losses would not
    reach the module the trainer reads, and all would share one routing recorder. (No GPUs here, so the
    replica is marked by hand, as ``torch.nn.parallel.replicate`` marks it.)"""
    from dynmole.model import find_mole

    ids, mask = _batch()
    model = get_mole_model(tiny_llama(), MoLEConfig(method="dynmole", r=4)).train()
    find_mole(model)._is_replica = True
    with pytest.raises(DynmoleError, match=r"^a MoLE model does not run under torch.nn.DataParallel .*torchrun"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
