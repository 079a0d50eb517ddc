"""Recovery after pruning (dip_ext.recovery): distillation, LoRA merge, gradients through a compacted model, exact
resume, reconstruction, options and bad input. Tiny random Llama models, fp32, one thread."""

from __future__ import annotations

import copy
import json
from pathlib import Path
import math

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import dip_ext
from dip_ext import STRUCTURES, DispMasks, ModelDims
from dip_ext.cli import prune_option_classes
from dip_ext.options import OptionParser
from dip_ext.recovery.checks import check_training_text
from dip_ext.recovery.command import add_recover_parser, run_recover
from dip_ext.recovery import RecoveryConfig, RecoveryResult, recover
from dip_ext.recovery.distill import distill
from dip_ext.recovery.lora import linear_names, lora_wrapped
from dip_ext.recovery.losses import kl_sum
from dip_ext.recovery.reconstruct import reconstruct
from dip_ext.recovery.stage import trainable_student
from dip_ext.training import EpochOrder

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 64, 16


def tiny_dense(seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                initializer_range=0.2), **overrides})  # peaked outputs: a KL worth fitting
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a wrong gather or gradient cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_masks(model, seed: int = 0, keep: float = 0.6) -> DispMasks:
    c = model.config
    dims = ModelDims(c.num_hidden_layers, c.hidden_size, c.intermediate_size)
    g = torch.Generator().manual_seed(seed)
    return DispMasks([{s: (torch.rand(dims.size(s), generator=g) < keep).nonzero().flatten() for s in STRUCTURES}
                      for _ in range(dims.num_layers)])


def pair(seed: int = 0, **overrides):
    teacher = tiny_dense(seed, **overrides)
    return dip_ext.compact(copy.deepcopy(teacher), tiny_masks(teacher, seed)), teacher


def windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def held_out_kl(student, teacher, val) -> float:
    with torch.no_grad():
        return float(kl_sum(student(input_ids=val).logits, teacher(input_ids=val).logits)) / (val.numel() - len(val))


def config(**kw) -> RecoveryConfig:
    """Small distillation options with ``kw`` on top (in another mode, without the options it does not read):
    fp32 on the recovery text, whatever the machine (the automatic choices are tested on their own)."""
    mode = kw.pop("recover", "distill")
    return RecoveryConfig(**{**dict(recover="auto", recover_steps=6, recover_lr=3e-3, recover_batch=2,
                                    recover_warmup=1, recover_val_every=2, recover_checkpoint_every=2,
                                    recover_autocast=False, recover_data="text", recover_teacher_dtype="same"), **kw}
                          ).with_mode(mode)


# ---- options ------------------------------------------------------------------------------------------------

def test_options_validate_and_make_flags():
    with pytest.raises(ValueError, match="recover_steps"):
        RecoveryConfig(recover_steps=-1)
    with pytest.raises(ValueError, match="recover must be one of"):
        RecoveryConfig(recover="lora")
    with pytest.raises(ValueError, match="recover_lr"):
        RecoveryConfig(recover_lr=0.0)
    parser = OptionParser(dataclass_types=[RecoveryConfig])
    (cfg,) = parser.parse_args_into_dataclasses(["--recover", "auto", "--recover-steps", "7", "--recover-lr", "2e-4"])
    assert cfg == RecoveryConfig(recover="auto", recover_steps=7, recover_lr=2e-4)
    assert cfg.lora_alpha == 0.0 and RecoveryConfig(recover_lora_rank=8).lora_alpha == 16.0


def test_flags_do_not_collide_with_prune_flags():
    assert RecoveryConfig in prune_option_classes()
    OptionParser(dataclass_types=prune_option_classes())  # argparse raises on a duplicate flag


# ---- the gradient path --------------------------------------------------------------------------------------

def _backward_both(dense, compacted, masks, ids) -> None:
    """The LM loss's backward through the masked dense model and through the compacted one."""
    with dip_ext.apply_masks(dense, masks):
        F.cross_entropy(dense(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    F.cross_entropy(compacted(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


def _assert_kept_gradients_equal(dense, compacted, masks, weights: dict, norms: tuple, norm_atol: float) -> int:
    """Each compacted weight's gradient equals the kept block of the dense weight's (``weights``: name -> (row
    structure or None, column structure or None)), each norm's gradient the dense norm's. Returns the weights
    checked."""
    checked = 0
    for i, (d, c) in enumerate(zip(dense.model.layers, compacted.model.layers)):
        idx = masks[i]
        for name, (rows, cols) in weights.items():
            g_dense = d.get_submodule(name).weight.grad
            g_dense = g_dense[idx[rows]] if rows is not None else g_dense
            g_dense = g_dense[:, idx[cols]] if cols is not None else g_dense
            torch.testing.assert_close(c.get_submodule(name).weight.grad, g_dense, rtol=1e-4, atol=1e-6)
            checked += 1
        for norm in norms:
            torch.testing.assert_close(c.get_submodule(norm).weight.grad, d.get_submodule(norm).weight.grad,
                                       rtol=1e-4, atol=norm_atol)
    return checked


def test_gradients_of_compacted_model_equal_masked_dense_for_kept_weights():
    dense = tiny_dense(1)
    masks = tiny_masks(dense, 1)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    _backward_both(dense, compacted, masks, windows(2, 3))
    kept = {  # compacted weight -> the dense weight's kept block
        "self_attn.q_proj": (None, "attn_in"), "self_attn.k_proj": (None, "attn_in"),
        "self_attn.v_proj": (None, "attn_in"), "self_attn.o_proj": ("attn_out", None),
        "mlp.gate_proj": ("mlp_mid", "mlp_in"), "mlp.up_proj": ("mlp_mid", "mlp_in"),
        "mlp.down_proj": ("mlp_out", "mlp_mid")}
    checked = _assert_kept_gradients_equal(dense, compacted, masks, kept,
                                           ("input_layernorm", "post_attention_layernorm"), 1e-6)
    assert checked == 14


def test_gradients_through_compacted_gemma3_sandwich_norms_equal_masked_dense():
    """Gemma3's post-block norms are folded into the residual update (RMS over the full width, (1 + w) scale):
    their autograd path must give the masked dense model's gradients too."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3, vocab_size=VOCAB,
                           max_position_embeddings=64, num_attention_heads=2, head_dim=32, num_key_value_heads=1,
                           query_pre_attn_scalar=32, sliding_window=4, tie_word_embeddings=True,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    dense = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1): make every scale distinct
        for n, p in dense.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5)
    masks = tiny_masks(dense, 1)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    _backward_both(dense, compacted, masks, windows(2, 3))
    kept = {"self_attn.q_proj": (None, "attn_in"), "self_attn.o_proj": ("attn_out", None),
            "mlp.up_proj": ("mlp_mid", "mlp_in"), "mlp.down_proj": ("mlp_out", "mlp_mid")}
    _assert_kept_gradients_equal(dense, compacted, masks, kept,
                                 ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                  "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"), 1e-7)


# ---- distillation -------------------------------------------------------------------------------------------

def test_distillation_lowers_held_out_kl():
    student, teacher = pair()
    train, val = windows(12, 1), windows(4, 2)
    before = held_out_kl(student, teacher, val)
    # no early stopping (its LM loss on random tokens says little): the last step is kept
    result = recover(student, teacher, train, None, config(recover_steps=20, recover_lr=1e-2), progress=False)
    after = held_out_kl(student, teacher, val)
    assert after < 0.8 * before, (before, after)
    assert result.chosen == ["distill"] and result.tokens == 20 * 2 * SEQ
    assert not any(p.requires_grad is False for p in student.parameters())  # flags restored (HF default: True)


def test_best_held_out_step_is_kept():
    student, teacher = pair()
    train, val = windows(12, 1), windows(4, 2)

    def diverge(entry):  # after step 3 the weights blow up (as a too-large step would): step 4 scores worst
        if entry["step"] == 3:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                for p in student.model.layers.parameters():
                    p.add_(torch.randn(p.shape, generator=g))

    result = recover(student, teacher, train, val, config(recover_steps=4), progress=False, callback=diverge)
    losses = {c["step"]: c["val_loss"] for c in result.curve}
    assert losses[4] > max(losses[0], losses[2])
    best = min(losses, key=losses.get)
    assert math.isclose(dip_ext.eval.mean_window_loss(student, val), losses[best], rel_tol=1e-6)
    assert result.val_loss_after == pytest.approx(losses[best])


def test_interrupted_at_step_3_and_resumed_equals_uninterrupted(tmp_path):
    train, val = windows(10, 1), windows(3, 2)
    cfg = config(recover_steps=6, recover_checkpoint_every=1)
    dropout = dict(attention_dropout=0.3)  # random in training: the resume must restore the RNG too
    ref_student, teacher = pair(**dropout)
    ref = recover(ref_student, teacher, train, val, cfg, work_dir=tmp_path / "ref", progress=False)

    student, teacher = pair(**dropout)

    def stop(entry):
        if entry["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(student, teacher, train, val, cfg, work_dir=tmp_path / "run", progress=False, callback=stop)
    student, teacher = pair(**dropout)  # a fresh process: the pruned model again, its checkpoint on disk
    resumed = recover(student, teacher, train, val, cfg, work_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.resumed
    assert resumed.distillation["losses"] == ref.distillation["losses"]  # bit-identical losses
    for a, b in zip(student.parameters(), ref_student.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="different run.*options.recover_lr: checkpoint 0.003 vs now 0.001"):
        recover(*pair(**dropout), train, val, config(recover_steps=6, recover_lr=1e-3), work_dir=tmp_path / "run",
                resume=True, progress=False)


def test_seeded_runs_repeat_and_window_order_is_a_function_of_the_step():
    assert EpochOrder(7, 3, seed=0).indices(5) == EpochOrder(7, 3, seed=0).indices(5)
    firsts = [i for s in range(7) for i in EpochOrder(7, 1, seed=0).indices(s)]
    assert sorted(firsts) == list(range(7))  # one pass covers each window once
    a, b = pair(), pair()
    ra = recover(*a, windows(8, 1), windows(2, 2), config(), progress=False)
    rb = recover(*b, windows(8, 1), windows(2, 2), config(), progress=False)
    assert ra.distillation["losses"] == rb.distillation["losses"]


def test_lm_loss_and_hidden_state_terms_train():
    student, teacher = pair()
    val = windows(4, 2)
    before = held_out_kl(student, teacher, val)
    recover(student, teacher, windows(12, 1), None, config(recover_steps=10, recover_lm_weight=0.5,
                                                          recover_hidden_weight=1.0, recover_temperature=2.0),
            progress=False)
    assert held_out_kl(student, teacher, val) < before


def test_dense_control_fine_tunes_on_the_lm_loss_alone():
    dense = tiny_dense(2)
    cfg = config(recover_lm_weight=1.0, recover_steps=8)
    with trainable_student(dense, cfg):
        run = distill(dense, None, windows(12, 1), windows(4, 2), cfg, progress=False)
    assert run.best_val_loss < run.curve[0][3]
    with pytest.raises(ValueError, match="recover_lm_weight"):
        with trainable_student(dense, config()):
            distill(dense, None, windows(12, 1), None, config(), progress=False)


# ---- LoRA ---------------------------------------------------------------------------------------------------

def test_lora_merged_equals_unmerged_and_saved_model_reloads(tmp_path):
    pytest.importorskip("peft")
    student, teacher = pair()
    ids = windows(2, 5)
    assert linear_names(student) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with lora_wrapped(student, rank=4, alpha=8.0, seed=0) as wrapped:
        trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        with torch.no_grad():
            for n, p in wrapped.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)  # what training does: B moves away from its zero init
            unmerged = wrapped(input_ids=ids).logits
    with torch.no_grad():
        merged = student(input_ids=ids).logits
    assert not any("lora" in n for n, _ in student.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert (merged - teacher(input_ids=ids).logits).abs().max() > 1e-3  # the adapters did change the model
    student.save_pretrained(tmp_path / "m")
    again = dip_ext.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-5)


def test_lora_wrapping_passes_on_no_library_deprecation_warning():
    pytest.importorskip("peft")
    student, _ = pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lora_wrapped(student, rank=4, alpha=8.0, seed=0):
            pass
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_lora_distillation_lowers_held_out_kl():
    pytest.importorskip("peft")
    student, teacher = pair()
    val = windows(4, 2)
    before = held_out_kl(student, teacher, val)
    result = recover(student, teacher, windows(12, 1), None, config(recover_lora_rank=4, recover_steps=12,
                                                                    recover_lr=1e-2), progress=False)
    assert held_out_kl(student, teacher, val) < before and result.chosen == ["distill"]
    assert type(student).__name__ == "DipExtLlamaForCausalLM"


# ---- reconstruction -----------------------------------------------------------------------------------------

def test_reconstruction_reduces_each_layers_output_error(tmp_path):
    student, teacher = pair()
    run = reconstruct(student, teacher, windows(8, 1), RecoveryConfig(recover="reconstruct", recover_recon_epochs=10,
                                                                      recover_recon_lr=3e-3),
                      work_dir=tmp_path, progress=False)
    assert len(run.error_before) == 2
    for before, after in zip(run.error_before, run.error_after):
        assert after < 0.9 * before, (before, after)
    # resuming a finished reconstruction reloads the layers instead of fitting them again
    again, teacher2 = pair()
    rerun = reconstruct(again, teacher2, windows(8, 1), RecoveryConfig(recover="reconstruct", recover_recon_epochs=10,
                                                                        recover_recon_lr=3e-3),
                        work_dir=tmp_path, resume=True, progress=False)
    assert rerun.resumed_from == 2 and rerun.error_after == run.error_after
    for a, b in zip(again.parameters(), student.parameters()):
        assert torch.equal(a, b)


def test_auto_keeps_reconstruction_only_when_it_helps():
    student, teacher = pair()
    result = recover(student, teacher, windows(8, 1), windows(3, 2),
                     config(recover="auto", recover_recon_epochs=5, recover_recon_lr=3e-3), progress=False)
    rec = result.reconstruction
    start = result.curve[0]["val_loss"]
    assert rec["kept"] == (rec["val_loss"] < start)
    assert ("reconstruct" in result.chosen) == rec["kept"]
    assert result.val_loss_after <= start


# ---- the result ---------------------------------------------------------------------------------------------

def test_curve_records_every_scoring():
    student, teacher = pair()
    result = recover(student, teacher, windows(12, 1), windows(4, 2), config(recover_steps=12), progress=False)
    assert [c["step"] for c in result.curve] == [0, 2, 4, 6, 8, 10, 12]
    assert [c["tokens"] for c in result.curve] == [s * 2 * SEQ for s in (0, 2, 4, 6, 8, 10, 12)]
    assert result.val_loss_after == min(c["val_loss"] for c in result.curve)


def test_result_report_lines_and_curve_png(tmp_path):
    student, teacher = pair()
    result = recover(student, teacher, windows(8, 1), windows(3, 2), config(), progress=False)
    lines = "\n".join(result.markdown_lines())
    assert "## Recovery" in lines and "| distill | 6 |" in lines
    best, cfg = result.distillation["best_step"], config()
    assert f"kept distill (the weights of step {best} of {cfg.recover_steps}, the best on the held-out" in lines
    assert f"Distillation: {cfg.recover_batch} windows a step, learning rate {cfg.recover_lr:g}" in lines
    result.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(result.to_dict())
    assert RecoveryResult(mode="off").markdown_lines() == []


def test_off_does_nothing():
    student, teacher = pair()
    before = [p.clone() for p in student.parameters()]
    assert recover(student, teacher, windows(4, 1), None, RecoveryConfig(recover="off")).chosen == []
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_is_refused_clearly():
    student, teacher = pair()
    train, val = windows(4, 1), windows(2, 2)
    cfg = config()
    with pytest.raises(ValueError, match="not a compacted model"):
        recover(copy.deepcopy(teacher), teacher, train, val, cfg)
    with pytest.raises(ValueError, match="vocabulary"):
        recover(student, tiny_dense(0, vocab_size=VOCAB + 8), train, val, cfg)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        recover(student, tiny_dense(0, num_hidden_layers=3), train, val, cfg)
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=64))
    with pytest.raises(ValueError, match="opt model"):
        recover(student, opt, train, val, cfg)
    with pytest.raises(ValueError, match="is empty"):
        recover(student, teacher, train[:0], val, cfg)
    with pytest.raises(ValueError, match="evaluation windows"):
        recover(student, teacher, train, val, cfg, forbidden_windows=train[1:2])
    with pytest.raises(ValueError, match="outside"):
        recover(student, teacher, train + VOCAB, val, cfg)
    with pytest.raises(ValueError, match="held-out"):
        recover(student, teacher, train, None, config(recover="auto"))
    with pytest.raises(ValueError, match="separate dense copy"):
        recover(student, student, train, val, cfg)
    with pytest.raises(ValueError, match="RecoveryConfig"):
        recover(student, teacher, train, val, {"recover": "distill"})


def test_training_text_that_is_an_evaluation_text_is_refused():
    check_training_text("wiki", ["wiki", "ptb"], calibration="wiki")  # the calibration text's training split: fine
    check_training_text("file:/x.txt", ["wiki", "ptb"], calibration="wiki")
    with pytest.raises(ValueError, match="also an evaluation text"):
        check_training_text("ptb", ["wiki", "ptb"], calibration="wiki")
    with pytest.raises(ValueError, match="recover_text"):
        check_training_text("", ["wiki"])


# ---- the command --------------------------------------------------------------------------------------------

def _recover_parser():
    parser = OptionParser(prog="dip-ext")
    add_recover_parser(parser.add_subparsers(dest="command", required=True, parser_class=OptionParser))
    return parser


def test_recover_command_saves_an_ordinary_dip_ext_checkpoint(tmp_path, word_tokenizer, word_text):
    student, teacher = pair()
    for folder, model in (("dense", teacher), ("pruned", student)):
        model.save_pretrained(tmp_path / folder)
        word_tokenizer.save_pretrained(tmp_path / folder)
    argv = ["recover", "--model", str(tmp_path / "pruned"), "--teacher", str(tmp_path / "dense"),
            "--out", str(tmp_path / "out"), "--calibration", word_text, "--seq-len", "16", "--val-windows", "4",
            "--recover-steps", "4", "--recover-batch", "2", "--recover-lr", "3e-3", "--recover-val-every", "2",
            "--recover-recon-windows", "4", "--eval-text", word_text, "--eval-windows", "2", "--eval-seq-len", "16", "--quiet"]
    args = _recover_parser().parse_args(argv)
    assert args.recover == "auto"
    assert run_recover(args) == 0
    record = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert record["recovery"]["mode"] == "auto" and set(record["perplexity_recovered"]) == {f"file:{Path(word_text[5:]).name}"}
    assert (tmp_path / "out" / "recovery.png").is_file() and (tmp_path / "out-work" / "distill.safetensors").is_file()
    again = dip_ext.from_pretrained(tmp_path / "out")
    ids = windows(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, student.__class__.from_pretrained(
            tmp_path / "out")(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not empty"):
        run_recover(_recover_parser().parse_args(argv))
    with pytest.raises(ValueError, match="does nothing"):
        run_recover(_recover_parser().parse_args(argv + ["--recover", "off", "--overwrite"]))
    with pytest.raises(ValueError, match="also an evaluation text"):
        run_recover(_recover_parser().parse_args(argv + ["--overwrite", "--recover-text", "ptb", "--eval-text",
                                                         word_text, "ptb"]))


# ---- memory options -----------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_training():
    train = windows(8, 1)
    plain, teacher = pair()
    ref = recover(plain, teacher, train, None, config(), progress=False)
    ckpt, teacher = pair()
    run = recover(ckpt, teacher, train, None, config(recover_grad_checkpointing=True), progress=False)
    assert not ckpt.is_gradient_checkpointing  # switched off again afterwards
    for (_, a), (_, b) in zip(run.distillation["losses"], ref.distillation["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(ckpt.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_low_precision_teacher_trains():
    student, teacher = pair()
    val = windows(4, 2)
    before = held_out_kl(student, teacher, val)
    recover(student, teacher, windows(12, 1), None, config(recover_steps=20, recover_lr=1e-2,
                                                           recover_teacher_dtype="bfloat16"), progress=False)
    assert next(teacher.parameters()).dtype == torch.bfloat16  # cast in place, as documented
    assert next(student.parameters()).dtype == torch.float32
    assert held_out_kl(student, teacher.float(), val) < before


def test_bf16_autocast_trains():
    student, teacher = pair()
    recover(student, teacher, windows(12, 1), None, config(recover_steps=2, recover_autocast=True), progress=False)
