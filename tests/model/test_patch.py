"""apply_aquila_kernels_to_llama: a transformers LlamaForCausalLM patched onto Aquila's kernels computes what the
unpatched model computes (loss, every parameter gradient, logits, greedy generation), on tiny random fp32 models on
CPU, for the instance patch and the class-level patch, with GQA, and with the fallbacks where a kernel does not apply.
"""

import copy
import io
import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import aquila.model.patch as patch_module  # noqa: E402  (after the importorskip)
from aquila.kernels import UnsupportedBackend  # noqa: E402
from aquila.model.patch import (  # noqa: E402
    AquilaLlamaAttention,
    AquilaLlamaRMSNorm,
    apply_aquila_kernels_to_llama,
    remove_aquila_kernels_from_llama,
)

modeling_llama = transformers.models.llama.modeling_llama
VOCAB = 300
# The default backend (the C++ kernels on CPU) and the pure-torch reference.
BACKENDS = [pytest.param(None, id="default"), pytest.param("torch", id="torch")]


def llama_config(kv_heads=2, **overrides):
    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                    intermediate_size=176, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, attn_implementation="eager")
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def random_llama(config):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init, so that errors are not hidden
            parameter.normal_(0.0, 0.3)
    return model.train()


def batch(size=3, length=37):
    """Odd length; the first tokens of every row and the tail of one row are not counted."""
    input_ids = torch.randint(0, VOCAB, (size, length))
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[1, 20:] = -100
    return input_ids, labels


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def assert_same_training_step(patched, reference, input_ids, labels, **kwargs):
    expected = reference(input_ids=input_ids, labels=labels, **kwargs)
    expected.loss.backward()
    actual = patched(input_ids=input_ids, labels=labels, **kwargs)
    actual.loss.backward()
    assert actual.logits is None  # training with labels: the fused loss, no logits
    assert relative_error(actual.loss, expected.loss) < 1e-5
    patched_parameters = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        # fp32 both ways; the kernels sum in other orders (blocked online softmax, chunked cross-entropy with an fp32
        # weight-gradient accumulator, per-thread partial sums of the norm weights' gradients), each a few fp32 ulps
        # (1.2e-7) of the largest term, carried through two layers' backward: measured below 2e-6 of each gradient's
        # largest element. 1e-5 of it, plus 1e-4 relative, leaves margin and still catches any real error (a wrong
        # mask, rotation or shift changes gradients by tens of percent).
        grad, expected_grad = patched_parameters[name].grad, parameter.grad
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item(),
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often the patched attention ran Aquila's rotary and attention kernels (so a test can tell the kernels from
    the fallback)."""
    calls = {"rotary": 0, "attention": 0}

    def counting(name, op):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(patch_module, "apply_rotary", counting("rotary", patch_module.apply_rotary))
    monkeypatch.setattr(patch_module, "attention", counting("attention", patch_module.attention))
    return calls


@pytest.fixture
def class_patch():
    """Restores transformers' classes after a test that patches them, whatever happens."""
    yield
    remove_aquila_kernels_from_llama()


# --- Instance patch -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [2, 1, 4], ids=["gqa", "mqa", "mha"])
def test_loss_and_gradients_match_transformers(backend, kv_heads, kernel_calls):
    reference = random_llama(llama_config(kv_heads))
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference), backend=backend)
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels)
    assert kernel_calls == {"rotary": 2, "attention": 2}  # one per layer: no fallback


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_without_labels_and_in_eval(backend):
    reference = random_llama(llama_config())
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference), backend=backend)
    input_ids, labels = batch()
    with torch.no_grad():
        assert relative_error(patched(input_ids).logits, reference(input_ids).logits) < 1e-5
        reference.eval()
        patched.eval()
        # Eval mode with labels: the original forward, logits and loss (evaluation loops compute metrics from them).
        expected, actual = reference(input_ids, labels=labels), patched(input_ids, labels=labels)
    assert relative_error(actual.logits, expected.logits) < 1e-5
    assert relative_error(actual.loss, expected.loss) < 1e-5


def test_patch_swaps_modules_and_keeps_parameters():
    model = random_llama(llama_config())
    parameters = dict(model.named_parameters())
    assert apply_aquila_kernels_to_llama(model) is model
    # The same Parameter objects under the same names: optimizers built before the patch, and checkpoints, still fit.
    assert dict(model.named_parameters()) == parameters
    assert all(patched is parameters[name] for name, patched in model.named_parameters())
    assert list(model.state_dict()) == list(parameters)
    norms = [m for m in model.modules() if isinstance(m, AquilaLlamaRMSNorm)]
    assert len(norms) == 5 and not any(isinstance(m, modeling_llama.LlamaRMSNorm) for m in model.modules())
    assert norms[0].variance_epsilon == 1e-5
    assert sum(isinstance(m, AquilaLlamaAttention) for m in model.modules()) == 2


def test_patching_twice_is_harmless_and_parts_can_be_switched_off():
    reference = random_llama(llama_config())
    patched = copy.deepcopy(reference)
    apply_aquila_kernels_to_llama(patched)
    apply_aquila_kernels_to_llama(patched)
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels)
    apply_aquila_kernels_to_llama(patched, rms_norm=False, rotary=False, attention=False, cross_entropy=False)
    assert not any(isinstance(m, (AquilaLlamaRMSNorm, AquilaLlamaAttention)) for m in patched.modules())
    assert "forward" not in patched.__dict__
    assert dict(patched.named_parameters()).keys() == dict(reference.named_parameters()).keys()


def test_each_part_alone_matches_transformers():
    reference = random_llama(llama_config())
    input_ids, labels = batch()
    for part in ("rms_norm", "rotary", "attention", "cross_entropy"):
        reference.zero_grad()
        options = {name: name == part for name in ("rms_norm", "rotary", "attention", "cross_entropy")}
        patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference), **options)
        if part == "cross_entropy":
            assert_same_training_step(patched, reference, input_ids, labels)
        else:
            expected = reference(input_ids=input_ids, labels=labels).loss
            assert relative_error(patched(input_ids=input_ids, labels=labels).loss, expected) < 1e-5, part


def test_loss_options_of_transformers(kernel_calls):
    """num_items_in_batch (gradient accumulation), return_dict=False, an all-ones attention_mask and a padded one: all
    on the kernels (a padded batch through the varlen kernel)."""
    reference = random_llama(llama_config())
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels, num_items_in_batch=torch.tensor(61))
    loss = patched(input_ids=input_ids, labels=labels, return_dict=False)[0]
    assert relative_error(loss, reference(input_ids=input_ids, labels=labels).loss) < 1e-5
    reference.zero_grad()
    patched.zero_grad()
    kernel_calls["attention"] = 0
    assert_same_training_step(patched, reference, input_ids, labels, attention_mask=torch.ones_like(input_ids))
    assert kernel_calls["attention"] == 2
    reference.zero_grad()
    patched.zero_grad()
    padded = torch.ones_like(input_ids)
    padded[0, :4] = 0  # left padding
    kernel_calls["attention"] = 0
    patch_module.reset_counts()
    assert_same_training_step(patched, reference, input_ids, labels, attention_mask=padded)
    assert kernel_calls["attention"] == 2
    assert patch_module.kernel_counts() == {"varlen": 2} and patch_module.fallback_counts() == {}


def test_gradient_checkpointing_and_whole_model_pickling():
    reference = random_llama(llama_config())
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    buffer = io.BytesIO()
    torch.save(patched, buffer)  # the patched forward is a partial of a module-level function: it pickles
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    input_ids, labels = batch()
    for model in (reference, reloaded):
        model.activation_checkpointing_enable()
    assert_same_training_step(reloaded, reference, input_ids, labels)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
], ids=lambda rope: rope["rope_type"])
def test_scaled_rope_runs_on_the_kernel_with_transformers_tables(rope, kernel_calls):
    config = llama_config(rope_parameters={**rope, "rope_theta": 10000.0})
    reference = random_llama(config)
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels)
    assert kernel_calls == {"rotary": 2, "attention": 2}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_greedy_generation_matches_transformers(attn_implementation, kernel_calls):
    reference = random_llama(llama_config(attn_implementation=attn_implementation)).eval()
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    prompt = torch.randint(0, VOCAB, (2, 9))
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for attention_mask in (torch.ones_like(prompt), torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])):
            expected = reference.generate(prompt, attention_mask=attention_mask, **settings)
            kernel_calls["attention"] = 0
            assert torch.equal(patched.generate(prompt, attention_mask=attention_mask, **settings), expected)
            # The kernels attend over transformers' DynamicCache (prefill + 9 steps, 2 layers), with left padding
            # through the varlen kernel.
            assert kernel_calls["attention"] == 20


# --- Class-level patch --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, "class"])
def test_class_patch_applies_to_models_built_afterwards(target, class_patch):
    config = llama_config()
    reference = random_llama(config)
    built_before = random_llama(config)
    apply_aquila_kernels_to_llama(transformers.LlamaForCausalLM if target == "class" else None)
    apply_aquila_kernels_to_llama(transformers.LlamaForCausalLM if target == "class" else None)  # harmless twice
    patched = transformers.LlamaForCausalLM(config)
    assert isinstance(patched.model.norm, AquilaLlamaRMSNorm)
    assert all(isinstance(layer.self_attn, AquilaLlamaAttention) for layer in patched.model.layers)
    assert not isinstance(built_before.model.norm, AquilaLlamaRMSNorm)
    assert list(patched.state_dict()) == list(reference.state_dict())
    patched.load_state_dict(reference.state_dict())
    patched.train()
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels)

    remove_aquila_kernels_from_llama()
    assert modeling_llama.LlamaRMSNorm is patch_module.ORIGINAL_RMS_NORM
    assert modeling_llama.LlamaAttention is patch_module.ORIGINAL_ATTENTION
    assert transformers.LlamaForCausalLM.forward is patch_module.ORIGINAL_CAUSAL_LM_FORWARD
    unpatched = transformers.LlamaForCausalLM(config).train()
    assert type(unpatched.model.norm) is modeling_llama.LlamaRMSNorm
    assert unpatched(input_ids=input_ids, labels=labels).logits is not None


def test_class_patch_options_reach_new_modules(class_patch):
    apply_aquila_kernels_to_llama(rms_norm=False, backend="torch")
    model = transformers.LlamaForCausalLM(llama_config())
    assert type(model.model.norm) is modeling_llama.LlamaRMSNorm
    assert model.model.layers[0].self_attn.aquila_options.backend == "torch"


# --- Arguments ------------------------------------------------------------------------------------------------------


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="LlamaForCausalLM.*got Linear"):
        apply_aquila_kernels_to_llama(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got GPT2LMHeadModel"):
        apply_aquila_kernels_to_llama(transformers.GPT2LMHeadModel)
    with pytest.raises(TypeError, match="got LlamaModel"):
        apply_aquila_kernels_to_llama(transformers.LlamaModel(llama_config()))
    model = random_llama(llama_config())
    with pytest.raises(TypeError, match="rms_norm must be True or False"):
        apply_aquila_kernels_to_llama(model, rms_norm="yes")
    with pytest.raises(ValueError, match="backend must be one of"):
        apply_aquila_kernels_to_llama(model, backend="reference")
    with pytest.raises(UnsupportedBackend, match="cuda has no training attention kernel"):
        apply_aquila_kernels_to_llama(model, backend="cuda")

    class CustomForward(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    custom = CustomForward(llama_config())
    with pytest.raises(ValueError, match="CustomForward overrides LlamaForCausalLM.forward"):
        apply_aquila_kernels_to_llama(custom)
    apply_aquila_kernels_to_llama(custom, cross_entropy=False)  # the rest still applies
    assert isinstance(custom.model.norm, AquilaLlamaRMSNorm)
    # A failed call patched nothing.
    assert type(model.model.norm) is modeling_llama.LlamaRMSNorm


# --- Padding, caches, counters --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_random_padding_in_chunks_over_a_cache(cache_implementation, attn_implementation):
    """Random 0/1 masks (padding anywhere, rows of padding only), fed in two chunks through transformers' caches: the
    second chunk's queries are not the first keys, and padded queries sit among real ones. Logits at every position
    as unpatched; every call on the kernels."""
    reference = random_llama(llama_config(attn_implementation=attn_implementation)).eval()
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    patch_module.reset_counts()
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, VOCAB, (3, 14), generator=generator)
        attention_mask = (torch.rand(3, 14, generator=generator) > 0.35).long()
        caches = [transformers.DynamicCache(config=reference.config) if cache_implementation == "dynamic" else
                  transformers.StaticCache(config=reference.config, max_cache_len=20) for _ in range(2)]
        for chunk in (slice(0, 8), slice(8, 14)):
            inputs = dict(input_ids=input_ids[:, chunk], attention_mask=attention_mask[:, :chunk.stop], use_cache=True)
            with torch.no_grad():
                expected = reference(**inputs, cache=caches[0]).logits
                actual = patched(**inputs, cache=caches[1]).logits
            assert relative_error(actual, expected) < 1e-5, (seed, chunk)
    assert patch_module.fallback_counts() == {}
    assert sum(patch_module.kernel_counts().values()) == 3 * 2 * 2


def test_fallbacks_are_counted_and_logged_once_per_reason(caplog):
    patched = apply_aquila_kernels_to_llama(random_llama(llama_config())).eval()
    input_ids, _ = batch()
    patch_module.reset_counts()
    with caplog.at_level(logging.DEBUG, logger="aquila.model.patch"), torch.no_grad():
        patched(input_ids, output_attentions=True)
        patched(input_ids, output_attentions=True)
        patched(input_ids)
    assert patch_module.fallback_counts() == {"output_attentions": 4}
    assert patch_module.kernel_counts() == {"dense": 2}
    messages = [record.getMessage() for record in caplog.records if record.name == "aquila.model.patch"]
    assert len(messages) == 1 and "output_attentions" in messages[0]
    patch_module.reset_counts()
    assert patch_module.fallback_counts() == {} and patch_module.kernel_counts() == {}


# --- Deprecated arguments -------------------------------------------------------------------------------------------


def warnings_of(model, **inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**inputs)
    return [(warning.category, str(warning.message), warning.filename, warning.lineno) for warning in caught]


@pytest.mark.parametrize("training", [True, False], ids=["fused_loss", "original_forward"])
@pytest.mark.parametrize("target", ["instance", "class"])
def test_deprecated_arguments_warn_as_in_transformers(training, target, class_patch):
    """transformers 5 renamed LlamaForCausalLM.forward's past_key_values to cache, with a FutureWarning (and another
    when both are given): the patched forward warns the same, from the same place, and uses the cache given."""
    reference = random_llama(llama_config()).train(training)
    input_ids, labels = batch()

    def calls():  # fresh caches for each model
        return [dict(past_key_values=None), dict(past_key_values=transformers.DynamicCache(), use_cache=True),
                dict(past_key_values=None, cache=None)]

    expected = [warnings_of(reference, input_ids=input_ids, labels=labels, **call) for call in calls()]
    assert all(len(caught) == 1 and caught[0][0] is FutureWarning for caught in expected)
    if target == "instance":
        patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    else:
        apply_aquila_kernels_to_llama()
        patched = reference  # the class's forward is patched for existing instances too
    assert [warnings_of(patched, input_ids=input_ids, labels=labels, **call) for call in calls()] == expected
    cache = transformers.DynamicCache()
    with pytest.warns(FutureWarning, match="past_key_values"):
        output = patched(input_ids=input_ids, past_key_values=cache, use_cache=True)
    assert output.cache is cache and cache.get_seq_length() == input_ids.shape[1]


def test_a_mask_changed_in_place_and_inference_mode():
    """The plan read from a mask is reused while the same mask comes back unchanged: a caller's 4-D mask changed in
    place between calls is read again. Inference-mode tensors (no version counter) work too."""
    reference = random_llama(llama_config(attn_implementation="sdpa")).eval()
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    input_ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    with torch.no_grad():
        for padding in (0, 3):
            mask[0, :, :, :padding] = False
            assert relative_error(patched(input_ids, attention_mask=mask).logits,
                                  reference(input_ids, attention_mask=mask).logits) < 1e-5
    padded = torch.ones_like(input_ids)
    padded[1, :2] = 0
    patch_module.reset_counts()
    with torch.inference_mode():
        expected = reference(input_ids, attention_mask=padded).logits
        assert relative_error(patched(input_ids, attention_mask=padded).logits, expected) < 1e-5
    assert patch_module.kernel_counts() == {"varlen": 2}
