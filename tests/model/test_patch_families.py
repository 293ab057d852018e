"""apply_aquila_kernels_to_<family> for every family beyond Llama (and Llama's MLP): a transformers causal LM patched
onto Aquila's kernels computes what the unpatched model computes, on tiny random fp32 models on CPU.

For each family, instance and class-level patch: the loss and every parameter gradient in training mode with labels,
with and without padding, against the unpatched model run in float64 (tests/tolerance.py's fp32 tolerance); greedy
generation identical to the unpatched fp32 model's; the classes restored by remove; which attention calls reached the
kernel and which fell back, by reason. Then what is particular to some families: sliding windows shorter than the
sequence, Gemma 2's two softcaps, Phi-3's partial rotary, Mixtral's router loss and expert implementations.
"""

import copy
import dataclasses
import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import aquila.model.patch as patch_module  # noqa: E402  (after the importorskip)
from aquila.model.patch import fallback_counts, kernel_counts, reset_counts  # noqa: E402
from tests.tolerance import assert_matches_reference  # noqa: E402

VOCAB = 300
LAYERS = 2


@dataclasses.dataclass(frozen=True)
class Case:
    """A family under test: its name in the patch's functions, its config class and transformers class prefix, the
    name of its MLP flag and of the module class the flag swaps, and the config of its tiny model."""

    name: str
    prefix: str
    mlp_flag: str = "swiglu"
    mlp_class: str = "MLP"
    settings: tuple = ()

    def config(self, **overrides):
        settings = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, attn_implementation="eager", pad_token_id=0)
        settings.update(dict(self.settings), **overrides)
        return getattr(transformers, f"{self.prefix}Config")(**settings)

    @property
    def causal_lm(self):
        return getattr(transformers, f"{self.prefix}ForCausalLM")

    @property
    def modeling(self):
        return getattr(transformers.models, self.name).__dict__[f"modeling_{self.name}"]

    def apply(self, *args, **kwargs):
        return getattr(patch_module, f"apply_aquila_kernels_to_{self.name}")(*args, **kwargs)

    def remove(self):
        return getattr(patch_module, f"remove_aquila_kernels_from_{self.name}")()

    def aquila_class(self, part):
        return getattr(patch_module, f"Aquila{self.prefix}{part}")


CASES = [
    Case("llama", "Llama"),
    Case("qwen2", "Qwen2"),
    Case("mistral", "Mistral"),
    Case("qwen3", "Qwen3", settings=(("head_dim", 16),)),
    Case("gemma", "Gemma", mlp_flag="geglu", settings=(("head_dim", 16),)),
    Case("gemma2", "Gemma2", mlp_flag="geglu", settings=(("head_dim", 16), ("query_pre_attn_scalar", 24))),
    Case("phi3", "Phi3"),
    Case("mixtral", "Mixtral", mlp_class="Experts", settings=(("num_local_experts", 4), ("num_experts_per_tok", 2))),
]
BY_NAME = {case.name: case for case in CASES}
families = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


def random_model(case, config):
    torch.manual_seed(0)
    model = case.causal_lm(config)
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init, so that errors are not hidden
            parameter.normal_(0.0, 0.3)
    return model.train()


def float64_copy(model):
    reference = copy.deepcopy(model).double()
    if getattr(reference.config, "_experts_implementation", None) is not None:
        # torch's grouped and batched matmuls take no float64: the same sums in transformers' expert loop.
        reference.config._experts_implementation = "eager"
    return reference


def pair(case, config, **options):
    """(unpatched float64 copy, patched fp32 model) of one random model."""
    model = random_model(case, config)
    return float64_copy(model), case.apply(model, **options)


def batch(size=3, length=37):
    """Odd length; the first tokens of every row and the tail of one row are not counted."""
    input_ids = torch.randint(1, VOCAB, (size, length))
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[1, 20:] = -100
    return input_ids, labels


def right_padding(input_ids):
    """Padding after the tokens of two rows. (Left padding gives the first queries of a row nothing to attend to,
    which transformers' eager attention turns into NaN in float64, its softmax being fp32: the float64 reference needs
    every query to see a key. tests/model/test_patch_coverage.py covers left padding against the fp32 model.)"""
    mask = torch.ones_like(input_ids)
    mask[0, -4:] = 0
    mask[2, -1:] = 0
    return mask


def float64_loss(model, input_ids, labels, **kwargs):
    """transformers' causal LM loss of a float64 model, computed in float64 (transformers' own casts the logits to
    fp32), with Mixtral's router loss added as transformers adds it."""
    output = model(input_ids=input_ids, **kwargs)
    logits = output.logits[:, :-1].flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
    if getattr(output, "aux_loss", None) is not None:
        loss = loss + model.router_aux_loss_coef * output.aux_loss
    return loss


def assert_matches_float64(actual, expected, name, layers=LAYERS):
    """tests/tolerance.py's fp32 bound, for a whole model: each of its stages (the decoder layers and the head) may add
    one kernel's error at the scale of its output, and a gradient carries the errors of every stage after its own, so
    layers + 1 times the bound at the expected tensor's scale."""
    assert_matches_reference(actual, expected, name, scale=(layers + 1) * expected.abs().max().item())


def assert_same_training_step(patched, reference, input_ids, labels, **kwargs):
    """The patched fp32 model's loss and gradients against the unpatched model's in float64, at fp32's tolerance."""
    expected = float64_loss(reference, input_ids, labels, **kwargs)
    expected.backward()
    actual = patched(input_ids=input_ids, labels=labels, **kwargs)
    actual.loss.backward()
    assert actual.logits is None  # training with labels: the fused loss, no logits
    assert_matches_float64(actual.loss, expected, "loss")
    patched_parameters = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        assert_matches_float64(patched_parameters[name].grad, parameter.grad, name)
    return actual


@pytest.fixture
def glu_calls(monkeypatch):
    """How often the patched MLPs ran Aquila's swiglu and geglu."""
    calls = {"swiglu": 0, "geglu": 0}

    def counting(name, op):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(patch_module, name, counting(name, getattr(patch_module, name)))
    return calls


@pytest.fixture
def class_patches():
    """Restores transformers' classes of every family after a test that patches them, whatever happens."""
    yield
    for case in CASES:
        case.remove()


# --- Every family ---------------------------------------------------------------------------------------------------


@families
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right_padded"])
def test_instance_patch_matches_the_training_step(case, padded, glu_calls):
    config = case.config()
    reference, patched = pair(case, config)
    input_ids, labels = batch()
    reset_counts()
    mask = right_padding(input_ids) if padded else None
    assert_same_training_step(patched, reference, input_ids, labels, attention_mask=mask)
    # Every attention call on the kernel (Gemma 2's logit softcapping too): batched, or varlen under padding.
    assert kernel_counts() == {"varlen" if padded else "dense": LAYERS} and fallback_counts() == {}
    # Every MLP on the fused activation (Mixtral: once per layer, the experts' gating of all their tokens at once).
    assert glu_calls[case.mlp_flag] == LAYERS


@families
def test_instance_patch_swaps_modules_and_keeps_parameters(case):
    model = random_model(case, case.config())
    parameters = dict(model.named_parameters())
    assert case.apply(model) is model
    assert all(patched is parameters[name] for name, patched in model.named_parameters())
    assert list(model.state_dict()) == list(parameters)
    original_norm = getattr(case.modeling, f"{case.prefix}RMSNorm")
    assert not any(isinstance(module, original_norm) for module in model.modules())
    for part in ("RMSNorm", "Attention", case.mlp_class):
        assert any(isinstance(module, case.aquila_class(part)) for module in model.modules()), part
    case.apply(model, rms_norm=False, rotary=False, attention=False, cross_entropy=False, **{case.mlp_flag: False})
    assert not any(type(module).__name__.startswith("Aquila") for module in model.modules())
    assert "forward" not in model.__dict__
    assert all(patched is parameters[name] for name, patched in model.named_parameters())


@families
def test_class_patch_applies_to_models_built_afterwards_and_remove_restores(case, class_patches, glu_calls):
    config = case.config()
    reference = float64_copy(random_model(case, config))
    originals = {part: getattr(case.modeling, f"{case.prefix}{part}") for part in ("RMSNorm", "Attention",
                                                                                 case.mlp_class)}
    original_forward = case.causal_lm.forward
    case.apply()
    for part in originals:
        assert getattr(case.modeling, f"{case.prefix}{part}") is case.aquila_class(part)
    patched = case.causal_lm(config)
    assert list(patched.state_dict()) == list(reference.state_dict())
    patched.load_state_dict(reference.state_dict())
    input_ids, labels = batch()
    assert_same_training_step(patched.train(), reference, input_ids, labels)
    assert glu_calls[case.mlp_flag] == LAYERS

    case.remove()
    for part, original in originals.items():
        assert getattr(case.modeling, f"{case.prefix}{part}") is original
    assert case.causal_lm.forward is original_forward
    unpatched = case.causal_lm(config).train()
    assert not any(type(module).__name__.startswith("Aquila") for module in unpatched.modules())
    assert unpatched(input_ids=input_ids, labels=labels).logits is not None


@families
def test_a_patched_model_pickles(case):
    """torch.save of the whole model: the Aquila classes and the fused forward (a partial of a module-level function)
    are found again by name."""
    model = case.apply(random_model(case, case.config()))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    assert reloaded.forward.func is model.forward.func
    input_ids, labels = batch()
    losses = [m(input_ids=input_ids, labels=labels).loss for m in (reloaded, model)]
    assert torch.equal(*losses)


@families
def test_greedy_generation_matches_transformers(case):
    model = random_model(case, case.config()).eval()
    patched = case.apply(copy.deepcopy(model))
    prompt = torch.randint(1, VOCAB, (2, 9))
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for attention_mask in (torch.ones_like(prompt), torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])):
            expected = model.generate(prompt, attention_mask=attention_mask, **settings)
            assert torch.equal(patched.generate(prompt, attention_mask=attention_mask, **settings), expected)


@families
def test_bad_arguments_are_clear_errors(case):
    other = BY_NAME["qwen2" if case.name == "llama" else "llama"]
    with pytest.raises(TypeError, match=f"expected a transformers {case.prefix}ForCausalLM.*got {other.prefix}"):
        case.apply(other.causal_lm)
    with pytest.raises(TypeError, match=f"apply_aquila_kernels_to_{case.name}: {case.mlp_flag} must be True or False"):
        case.apply(None, **{case.mlp_flag: 1})
    with pytest.raises(ValueError, match="backend must be one of"):
        case.apply(None, backend="fast")


# --- Sliding windows ------------------------------------------------------------------------------------------------


WINDOWED = {
    # The configs that give some layers (Qwen2: the layers from max_window_layers on) a window of 8 keys.
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "mistral": dict(sliding_window=8),
    "qwen3": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "gemma2": dict(sliding_window=8, attn_logit_softcapping=None),
    "phi3": dict(sliding_window=8),
    "mixtral": dict(sliding_window=8),
}


def windowed_layers(config):
    types = getattr(config, "layer_types", None)
    return LAYERS if types is None else types.count("sliding_attention")


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right_padded"])
def test_a_window_shorter_than_the_sequence(name, padded):
    """transformers' sliding causal mask is recognised: its layers run on the kernel with the window where nothing is
    padded, else fall back under "sliding_window"; full layers stay on the kernel."""
    case = BY_NAME[name]
    config = case.config(**WINDOWED[name])
    windowed = windowed_layers(config)
    assert windowed > 0
    reference, patched = pair(case, config)
    input_ids, labels = batch()
    reset_counts()
    assert_same_training_step(patched, reference, input_ids, labels,
                              attention_mask=right_padding(input_ids) if padded else None)
    full = {"varlen" if padded else "dense": LAYERS - windowed} if windowed < LAYERS else {}
    if not padded:
        assert kernel_counts() == {"dense": LAYERS} and fallback_counts() == {}
    else:
        assert kernel_counts() == full and fallback_counts() == {"sliding_window": windowed}


@pytest.mark.parametrize("name, attn_implementation", [("mistral", "eager"), ("mistral", "sdpa"),
                                                      ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_generation_past_the_window(name, attn_implementation):
    """Prompt and new tokens outgrow the window (with SDPA too, whose sliding masks are boolean): the tokens of the
    unpatched model."""
    case = BY_NAME[name]
    model = random_model(case, case.config(**WINDOWED[name], attn_implementation=attn_implementation)).eval()
    patched = case.apply(copy.deepcopy(model))
    prompt = torch.randint(1, VOCAB, (2, 11))
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for attention_mask in (torch.ones_like(prompt), torch.tensor([[0, 0, 0] + [1] * 8, [1] * 11])):
            expected = model.generate(prompt, attention_mask=attention_mask, **settings)
            assert torch.equal(patched.generate(prompt, attention_mask=attention_mask, **settings), expected)


# --- What is particular to some families ----------------------------------------------------------------------------


def test_compiled_training_step_with_a_window():
    """torch.compile(fullgraph=True) of a Mistral whose window hides keys: torch.cond takes transformers' attention
    for the sliding mask (under compile only plain causal masks run the kernel), with the loss and gradients of the
    uncompiled unpatched model."""
    torch._dynamo.reset()
    case = BY_NAME["mistral"]
    reference, patched = pair(case, case.config(**WINDOWED["mistral"], num_hidden_layers=1, attn_implementation="sdpa"))
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    input_ids, labels = batch()
    expected = float64_loss(reference, input_ids, labels, use_cache=False)
    expected.backward()
    loss = compiled(input_ids=input_ids, labels=labels, use_cache=False).loss
    loss.backward()
    assert_matches_float64(loss, expected, "loss", layers=1)
    patched_parameters = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        assert_matches_float64(patched_parameters[name].grad, parameter.grad, name, layers=1)


def test_gemma2_with_both_softcaps():
    """Caps small enough to bite at these logit sizes: attention (on the kernel's softcap) and final logits (the
    fused loss's softcap) both as transformers."""
    case = BY_NAME["gemma2"]
    config = case.config(attn_logit_softcapping=2.0, final_logit_softcapping=1.5, sliding_window=8)
    reference, patched = pair(case, config)
    input_ids, labels = batch()
    reset_counts()
    assert_same_training_step(patched, reference, input_ids, labels)
    assert kernel_counts() == {"dense": LAYERS} and fallback_counts() == {}
    # The final cap changes the loss: the comparison above could not pass with the softcap dropped.
    patched.config.final_logit_softcapping = None
    with torch.no_grad():
        uncapped = patched(input_ids=input_ids, labels=labels).loss
    assert abs(uncapped.item() - float64_loss(reference, input_ids, labels).item()) > 0.1


def test_phi3_partial_rotary_takes_transformers_rotation():
    case = BY_NAME["phi3"]
    reference, patched = pair(case, case.config(partial_rotary_factor=0.5))
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels)


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm", "eager"])
def test_mixtral_router_loss_and_expert_implementations(experts_implementation, glu_calls):
    """The router's load-balancing loss is added to the fused loss as transformers adds it; the gating runs on
    swiglu under grouped_mm and batched_mm, and stays transformers' in the eager expert loop."""
    case = BY_NAME["mixtral"]
    config = case.config(output_router_logits=True, router_aux_loss_coef=0.5,
                         experts_implementation=experts_implementation)
    reference, patched = pair(case, config)
    input_ids, labels = batch()
    actual = assert_same_training_step(patched, reference, input_ids, labels)
    assert actual.aux_loss is not None
    assert glu_calls["swiglu"] == (0 if experts_implementation == "eager" else LAYERS)


def test_llama_mlp_with_another_activation_keeps_transformers_forward(glu_calls):
    """An activation the GLU kernels do not compute (gelu_new's formula) keeps transformers' MLP forward."""
    case = BY_NAME["llama"]
    reference, patched = pair(case, case.config(hidden_act="gelu_new"))
    input_ids, labels = batch()
    assert_same_training_step(patched, reference, input_ids, labels)
    assert glu_calls == {"swiglu": 0, "geglu": 0}


# --- The window_size and softcap arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2"])
def test_windows_and_softcaps_as_kernel_arguments(name):
    """transformers' sliding_window W is the kernel's window_size (W - 1, 0), and Gemma 2's attention softcap the
    kernel's softcap: every layer of an unpadded batch runs on the kernel, with the unpatched model's loss and
    gradients."""
    case = BY_NAME[name]
    settings = dict(WINDOWED[name], **({"attn_logit_softcapping": 2.0} if name == "gemma2" else {}))
    reference, patched = pair(case, case.config(**settings))
    input_ids, labels = batch()
    reset_counts()
    assert_same_training_step(patched, reference, input_ids, labels)
    assert kernel_counts() == {"dense": LAYERS} and fallback_counts() == {}


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_left_padded_generation_past_the_window_on_the_kernel(name):
    """Left padding (generation's case) with a window that hides keys: the varlen kernel with the window, every call
    on the kernel, the tokens of the unpatched model."""
    case = BY_NAME[name]
    model = random_model(case, case.config(**WINDOWED[name])).eval()
    patched = case.apply(copy.deepcopy(model))
    prompt = torch.randint(1, VOCAB, (2, 11))
    attention_mask = torch.tensor([[0, 0, 0] + [1] * 8, [1] * 11])
    settings = dict(attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                    pad_token_id=0)
    reset_counts()
    with torch.no_grad():
        expected = model.generate(prompt, **settings)
        assert torch.equal(patched.generate(prompt, **settings), expected)
    # The prefill on the varlen kernel; each step too for Gemma 2's full layer, which sees the padding, and on the
    # batched kernel for the sliding layers, whose windows have left the padding behind.
    full = LAYERS - windowed_layers(model.config)
    assert fallback_counts() == {}
    assert kernel_counts() == {"varlen": LAYERS + 7 * full, "dense": 7 * (LAYERS - full)}
