"""peft methods on compacted models whose blocks are removed, for every family: each method that works on the
dense model trains (forward with labels, backward) and generates on the compacted one, or is refused naming why;
prefix tuning and cartridges (a KV cache pre-filled for every layer, removed attentions included) are exact
against the masked dense reference. Tiny random configs, fp32, CPU."""

import copy

import pytest
import torch
from helpers import assert_rel_close, dims_of, random_masks
from test_families_hf import FAMILY_MODELS, VOCAB, make_dense
from transformers import StaticCache

import dip_ext
from dip_ext.modeling import ADAPTION_PROMPT_REFUSAL

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated",
                                        "ignore:Initializing zero-element tensors is a no-op")

FAMILIES = list(FAMILY_MODELS)
#: layer 0 loses its attention (caches read their length from layer 0), layer 1 both blocks (a full-attention
#: layer in Gemma3, whose layer 0 is a sliding one), layer 3 its MLP
REMOVED = {0: ["attn_out"], 1: ["attn_out", "mlp_out"], 3: ["mlp_out"]}
SKIPPED = (0, 1)  # the layers whose attention is removed
PREFIX = 4  # virtual tokens

#: peft method → (its config class, the config's arguments for a tiny model; peft's target modules otherwise)
METHODS = {
    "prefix_tuning": ("PrefixTuningConfig", dict(num_virtual_tokens=PREFIX)),
    "cartridge": ("CartridgeConfig", dict(num_virtual_tokens=PREFIX)),
    "prompt_tuning": ("PromptTuningConfig", dict(num_virtual_tokens=PREFIX)),
    "p_tuning": ("PromptEncoderConfig", dict(num_virtual_tokens=PREFIX, encoder_hidden_size=16)),
    "lora": ("LoraConfig", dict(r=4)),
    "dora": ("LoraConfig", dict(r=4, use_dora=True)),
    # peft has no AdaLoRA targets for Mistral and Phi: every family has q_proj / v_proj
    "adalora": ("AdaLoraConfig", dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])),
    "ia3": ("IA3Config", {}),
    "loha": ("LoHaConfig", dict(r=4)),
    "lokr": ("LoKrConfig", dict(r=4)),
    "vera": ("VeraConfig", dict(r=4)),
    "oft": ("OFTConfig", dict(r=0, oft_block_size=4)),
    "ln_tuning": ("LNTuningConfig", {}),
}
#: peft has no LN tuning targets for OPT
LN_TUNING_OPT = ["self_attn_layer_norm", "final_layer_norm"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def method_config(method: str, family: str, **overrides):
    """A fresh causal-LM config for ``family`` of ``method`` (a key of :data:`METHODS`, or a peft config class
    name), ``overrides`` on top; skips the test where this peft lacks the class."""
    name, kwargs = METHODS.get(method, (method, {}))
    cls = getattr(peft, name, None)
    if cls is None:
        pytest.skip(f"this peft has no {name}")
    if method == "ln_tuning" and family == "opt":
        kwargs = {**kwargs, "target_modules": LN_TUNING_OPT}
    return cls(task_type="CAUSAL_LM", **{**kwargs, **overrides})


def compacted(family: str, full_widths: bool = False):
    """(dense, masks, compacted copy): random widths (or full ones) with the blocks of :data:`REMOVED` removed."""
    dense = make_dense(family)
    dims = dims_of(dense)
    masks = random_masks(dims, 0, 0.7, full=range(dims.num_layers) if full_widths else (), empty=REMOVED)
    return dense, masks, dip_ext.compact(copy.deepcopy(dense), masks)


def inputs(batch: int = 2, length: int = 6):
    ids = torch.randint(3, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def train_step_and_generate(model) -> None:
    """One forward with labels and its backward (finite loss and gradients, some gradient non-zero), then three
    greedy tokens through the KV cache."""
    ids, mask = inputs()
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.count_nonzero() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)


# ---- every method: trains and generates, or is refused naming why ----------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_method_trains_and_generates_on_a_compacted_model(family, method):
    _, _, model = compacted(family)
    train_step_and_generate(peft.get_peft_model(model, method_config(method, family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_boft_needs_widths_its_block_size_divides(family):
    """BOFT splits every targeted input width into blocks: compacted widths that the block size divides work,
    others are refused by peft, naming the width."""
    _, _, model = compacted(family, full_widths=True)
    train_step_and_generate(peft.get_peft_model(model, method_config("BOFTConfig", family, boft_block_size=4)))
    _, _, model = compacted(family)
    with pytest.raises(ValueError, match=r"in_features \(\d+\) must be divisible by boft_block_size \(4\)"):
        peft.get_peft_model(model, method_config("BOFTConfig", family, boft_block_size=4))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_adaption_prompt_is_refused_naming_why(family):
    """peft offers adaption prompt for the dense family; on a compacted one it is refused when wrapping (peft's
    default targets) or, with explicit targets, on the first forward."""
    config = dict(adapter_len=4, adapter_layers=2)
    dense = make_dense(family)
    ids, mask = inputs()
    peft.get_peft_model(dense, method_config("AdaptionPromptConfig", family, **config))(input_ids=ids)
    _, _, model = compacted(family)
    with pytest.raises(ValueError) as refused:
        peft.get_peft_model(model, method_config("AdaptionPromptConfig", family, **config))
    assert str(refused.value) == ADAPTION_PROMPT_REFUSAL
    _, _, model = compacted(family)
    wrapped = peft.get_peft_model(model, method_config("AdaptionPromptConfig", family, target_modules="self_attn",
                                                       **config))
    with pytest.raises(ValueError, match="adaption prompt cannot wrap a dip_ext compacted model"):
        wrapped(input_ids=ids, attention_mask=mask)


# ---- prefix tuning: exact against the masked dense reference ---------------------------------------------------

def run_prefix(model, ids, mask):
    """(logits, the prompt encoder's gradients of their sum of squares by parameter name, the cache, greedy
    generate's output)."""
    model.eval()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    out.logits.pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.prompt_encoder.named_parameters() if p.requires_grad}
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.logits.detach(), grads, out.past_key_values, gen


@pytest.mark.parametrize("method", ["prefix_tuning", "cartridge"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_matches_the_masked_dense_model(family, method):
    """The same prefix on both: logits, the prefix's gradients (zero for the removed attentions' entries in
    both) and generated tokens agree; every layer's cache entry holds the prefix and the tokens."""
    dense, masks, model = compacted(family)
    ref_model = peft.get_peft_model(dense, method_config(method, family))
    peft_model = peft.get_peft_model(model, method_config(method, family))
    peft_model.prompt_encoder.load_state_dict(ref_model.prompt_encoder.state_dict())
    ids, mask = inputs(length=7)
    with dip_ext.apply_masks(dense, masks):
        ref_logits, ref_grads, _, ref_gen = run_prefix(ref_model, ids, mask)
    logits, grads, cache, gen = run_prefix(peft_model, ids, mask)
    assert_rel_close(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert_rel_close(g, ref_grads[name])
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, r in zip(gen.logits, ref_gen.logits):
        assert_rel_close(a, r)
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [PREFIX + 7] * len(cache.layers)


# ---- the removed attentions' cache entries ----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_removed_attention_writes_the_shape_its_cache_entry_holds(family):
    """A plain cache: the removed attentions' entries hold one head of width 1. A static cache allocated ahead at
    the model's head shape (transformers' early_initialization, as export does): they are written at that
    shape, and generation matches the masked dense model's."""
    dense, masks, model = compacted(family)
    ids, mask = inputs()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    for i in SKIPPED:
        keys, values = plain.layers[i].keys, plain.layers[i].values
        assert keys.shape == values.shape and (keys.shape[1], keys.shape[3]) == (1, 1)
    assert all(plain.get_seq_length(i) == ids.shape[1] for i in range(len(plain.layers)))

    def generate(m):
        cfg = m.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = StaticCache(config=cfg, max_cache_len=16)
        cache.early_initialization(2, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), head_dim,
                                   torch.float32, torch.device("cpu"))
        with torch.no_grad():
            return m.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                              min_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)

    with dip_ext.apply_masks(dense, masks):
        ref = generate(dense)
    out = generate(model)
    assert torch.equal(out.sequences, ref.sequences)
    for a, r in zip(out.logits, ref.logits):
        assert_rel_close(a, r)
