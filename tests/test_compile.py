"""Compacted models under torch.compile (fullgraph: no graph breaks from the dip_ext ops), with transformers'
StaticCache (generate and the capturable decode step of dip_ext.decoding), including layers whose attention or MLP
was pruned away; index sets that follow device moves; dip_ext.benchmarking's floor and budget widths;
benchmarks/e2e.py in --quick mode (run as a script). Tiny random Llama configs, fp32, CPU."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import dims_of, perturb_norms_and_biases, random_masks, tiny_llama

import dip_ext
from dip_ext import DispMasks
from dip_ext.benchmarking import random_budget_widths, same_widths
from dip_ext.decoding import DecodeSession, HostSyncDetector

VOCAB = 96
E2E = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


def make_dense(seed: int = 0, kv_heads: int = 2):
    model = tiny_llama(seed, vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                       num_attention_heads=6, num_key_value_heads=kv_heads, max_position_embeddings=128,
                       attn_implementation="sdpa")
    return perturb_norms_and_biases(model)


def make_masks(model, seed: int = 0) -> DispMasks:
    """Random sets; layer 0 has no attention (its cache slot holds a placeholder), layer 2 no MLP."""
    return random_masks(dims_of(model), seed, 0.6, empty={0: ["attn_out"], 2: ["mlp_out"]})


def run_e2e(*argv) -> subprocess.CompletedProcess:
    """benchmarks/e2e.py run as a script (as benchmarks/gpu/check.sh runs it), output captured as text."""
    return subprocess.run([sys.executable, str(E2E), *argv], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def models():
    dense = make_dense(seed=1)
    masks = make_masks(dense, seed=1)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    return dense, masks, compacted


def reference_generate(dense, masks, ids, n, **kw):
    with torch.no_grad(), dip_ext.apply_masks(dense, masks):
        return dense.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)


def test_compile_fullgraph_aot_eager_matches_eager(models):
    _, _, compacted = models
    torch._dynamo.reset()
    ids = torch.randint(0, VOCAB, (2, 9))
    compiled = torch.compile(compacted, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    with torch.no_grad():
        expected = compacted(ids).logits
        got = compiled(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager(models):
    _, _, compacted = models
    torch._dynamo.reset()
    ids = torch.randint(0, VOCAB, (1, 7))
    compiled = torch.compile(compacted, fullgraph=True, backend="inductor")
    with torch.no_grad():
        expected = compacted(ids).logits
        got = compiled(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_static_cache_generate_matches_reference(models):
    dense, masks, compacted = models
    ids = torch.randint(0, VOCAB, (2, 6))
    ref = reference_generate(dense, masks, ids, 10)
    with torch.no_grad():
        out = compacted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                 pad_token_id=0, cache_implementation="static")
    assert torch.equal(out, ref)
    # the pruned attention of layer 0 stores a 1-head, 1-wide placeholder, not a full KV entry
    assert compacted.model.layers[0].self_attn is None


def test_static_cache_padded_batch_matches_reference(models):
    dense, masks, compacted = models
    ids = torch.randint(1, VOCAB, (2, 7))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding
    kw = dict(attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(ids, **kw)
        out = compacted.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(out, ref)


def test_decode_step_has_no_host_sync_and_matches_generate(models):
    """The benchmark's decode step (static cache, 4-D mask, state advanced by tensor ops) is what gets captured
    into a CUDA graph: it must read nothing back to the host and reproduce greedy generation."""
    dense, masks, compacted = models
    session = DecodeSession(compacted, batch=2, prompt_len=5, max_len=64, seed=3)
    with torch.inference_mode():
        session.prefill()
        tokens = [session.ids.clone()]
        detector = HostSyncDetector()
        with detector:
            for _ in range(7):
                session.step()
                tokens.append(session.ids.clone())
    assert detector.seen == []
    ref = reference_generate(dense, masks, session.prompt, 8)[:, 5:]
    assert torch.equal(torch.cat(tokens, 1), ref)


def test_host_sync_detector_can_fail():
    detector = HostSyncDetector()
    with detector:
        x = torch.ones(3)
        if x.sum() > 0:  # bool(tensor): a host read
            pass
        x.nonzero()
    assert any("_local_scalar_dense" in s for s in detector.seen) and any("nonzero" in s for s in detector.seen)


@pytest.mark.slow
def test_decode_step_compiles_fullgraph(models):
    """One decode step with a StaticCache traces into a single graph (what mode="reduce-overhead" captures)."""
    dense, masks, compacted = models
    torch._dynamo.reset()
    eager = DecodeSession(compacted, batch=1, prompt_len=4, max_len=64, seed=5)
    compiled = DecodeSession(compacted, batch=1, prompt_len=4, max_len=64, seed=5)
    step = torch.compile(compiled.step, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager.prefill()
        compiled.prefill()
        for _ in range(3):
            eager.step()
            step()
            assert torch.equal(compiled.ids, eager.ids)
    assert int(compiled.pos[0, 0]) == 4 + 3


def test_same_widths_floor_runs_and_restores(models):
    _, _, compacted = models
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        before = compacted(ids).logits
        with same_widths(compacted):
            floor = compacted(ids).logits
            session = DecodeSession(compacted, batch=2, prompt_len=3, max_len=16)
            session.prefill()
            session.step()
        after = compacted(ids).logits
    assert floor.shape == before.shape and torch.isfinite(floor).all()
    assert not torch.allclose(floor, before)  # it really ran other (prefix) columns
    assert torch.equal(after, before)  # the patch is gone
    with pytest.raises(ValueError, match="compacted Llama"):
        with same_widths(make_dense()):
            pass


def test_index_sets_follow_device_moves(models):
    """Moving a compacted model creates every index set's copy for the new device up front (nothing is created
    lazily inside a compiled / captured region). 'meta' stands in for a GPU here."""
    from dip_ext.modules import IndexSet

    _, _, compacted = models
    moved = copy.deepcopy(compacted).to("meta")
    sets = [v for m in moved.modules() for v in vars(m).values() if isinstance(v, IndexSet)]
    assert len(sets) >= 2 * 4  # two output sets per layer, plus the norms' input sets
    assert all(torch.device("meta") in s._copies for s in sets)  # checked before any forward could create them


def test_budget_widths_hit_the_ratio():
    from dip_ext.families import adapter_for

    model = make_dense()
    config = model.config
    a = adapter_for(config)
    full = {"attn_in": 48, "attn_out": 48, "mlp_in": 48, "mlp_mid": 80, "mlp_out": 48}
    dense = 4 * sum(a.linear_params(config, full).values())
    for ratio in (0.3, 0.5):
        widths = random_budget_widths(model, ratio, multiple_of=8, spread=0.25, seed=0)
        kept = sum(sum(a.linear_params(config, w).values()) for w in widths)
        assert abs((1 - kept / dense) - ratio) < 0.05
        assert all(w[s] % 8 == 0 and 8 <= w[s] <= full[s] for w in widths for s in w)
    with pytest.raises(ValueError):
        random_budget_widths(model, 1.5, 8, 0.25, 0)


def test_budget_widths_with_a_kv_target_keep_few_enough_groups():
    from dip_ext.families import adapter_for
    from dip_ext.selection import Budget

    model = make_dense()
    config = model.config
    groups = config.num_key_value_heads * config.num_hidden_layers
    for kv_ratio in (0.3, 0.5):
        budget = Budget.for_model(model, 0.3, kv_ratio=kv_ratio)
        widths = random_budget_widths(model, 0.3, multiple_of=8, spread=0.25, seed=0, kv_ratio=kv_ratio)
        kept_groups = [w["kv_groups"] for w in widths]
        assert sum(kept_groups) == budget.kv_groups_kept <= (1 - kv_ratio) * groups
        assert max(kept_groups) - min(kept_groups) <= 1  # spread evenly over the layers
        kept = sum(sum(adapter_for(config).linear_params(config, w).values()) for w in widths)
        assert kept <= budget.target_linear and abs(kept / budget.dense_linear - 0.7) < 0.05


def test_e2e_quick_run_writes_every_section(tmp_path):
    """benchmarks/e2e.py --quick on CPU: every code path of the GPU run except the capture itself."""
    out = tmp_path / "e2e.json"
    run = run_e2e("--device", "cpu", "--quick", "--threads", "1", "--prefill-lens", "16", "--batches", "2",
                  "--repeats", "1", "--decode-repeats", "1", "--ratios", "0.5", "--kv-ratio", "0.5", "--out", str(out))
    rc = run.returncode
    data = json.loads(out.read_text())
    assert rc == 0 and data["errors"] == [], run.stderr[-3000:]
    assert data["selfcheck"]["ok"] and data["selfcheck"]["host_syncs_in_step"] == []
    keys = {"dense", "compacted@0.5", "same-widths@0.5", "kv-groups@0.5"}
    assert {r["key"] for r in data["prefill"]} == keys
    assert {r["key"] for r in data["decode"]} == keys
    assert all(r["tokens_per_s"] > 0 for r in data["prefill"] + data["decode"])
    assert abs(data["masks"]["0.5"]["removed_decoder_linear"] - 0.5) < 0.05
    kv = data["masks"]["kv-groups@0.5"]  # the same parameter budget, at least half of the KV cache gone
    assert abs(kv["removed_decoder_linear"] - 0.5) < 0.05
    assert kv["kv_cache_bytes_per_token"] <= 0.5 * kv["dense_kv_cache_bytes_per_token"]
    assert data["masks"]["0.5"]["kv_cache_bytes_per_token"] == kv["dense_kv_cache_bytes_per_token"]
    comp = next(r for r in data["prefill"] if r["key"] == "compacted@0.5")
    assert 1.5 < comp["linear_flop_ratio"] < 2.5
    assert all(r["cuda_graph"] is False for r in data["decode"])  # CPU: eager steps
    assert [t["name"] for t in data["targets"]] and all("quick" in t["note"] for t in data["targets"])
    printed = run.stdout
    assert "same-widths@0.5" in printed and "targets" in printed


@pytest.mark.parametrize("argv", [["--ratios", "0"], ["--ratios", "x"], ["--batches", "0"], ["--prefill-lens", "a"],
                                  ["--kv-ratio", "1.5"]])
def test_e2e_bad_arguments_exit_with_a_message(argv):
    run = run_e2e("--device", "cpu", *argv)
    assert run.returncode == 2 and "--" in run.stderr
