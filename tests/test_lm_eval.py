"""lm-evaluation-harness on a dense and a pruned (compacted, saved) tiny Llama: the pruned folder loads through
``trust_remote_code`` exactly as ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` does, and
a local multiple-choice task (tests/data/lm_eval: a task YAML + 8 JSONL questions) runs offline."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (see requirements-dev.txt)")

import dip_ext  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "lm_eval"
TASK = "dip_tiny_mc"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, word_tokenizer):
    """A dense and a pruned tiny Llama saved with the offline word tokenizer (conftest.py; the questions use its
    words only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm_eval_models")
    tok = word_tokenizer
    for line in (DATA / "tiny_mc.jsonl").read_text().splitlines():  # every word is in the vocabulary
        doc = json.loads(line)
        assert tok.unk_token_id not in tok(" ".join([doc["question"], *doc["choices"]])).input_ids
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    dense = LlamaForCausalLM(cfg).eval()
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    g = torch.Generator().manual_seed(0)
    sizes = {"attn_in": 32, "attn_out": 32, "mlp_in": 32, "mlp_mid": 64, "mlp_out": 32}
    masks = dip_ext.DispMasks([{s: torch.randperm(n, generator=g)[: n // 2].sort().values for s, n in sizes.items()}
                               for _ in range(2)])
    pruned = dip_ext.compact(copy.deepcopy(dense), masks)
    pruned.save_pretrained(root / "pruned")
    tok.save_pretrained(root / "pruned")
    return root / "dense", root / "pruned"


@pytest.fixture
def offline_task_dir(tmp_path, monkeypatch):
    """The task files in a fresh folder we run from (data_files is relative); hub and datasets offline."""
    for name in ("dip_tiny_mc.yaml", "tiny_mc.jsonl"):
        shutil.copy(DATA / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return tmp_path


def _evaluate(model, task_dir, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                                  batch_size=4, log_samples=True, **kw)
    n = out["n-samples"][TASK]
    effective = n["effective"] if isinstance(n, dict) else n.effective
    assert effective == 8  # every question of tiny_mc.jsonl was scored
    loglik = [float(r[0]) for s in out["samples"][TASK] for r in s["filtered_resps"]]
    return out["results"][TASK], loglik


@pytest.mark.slow
def test_lm_eval_dense_and_pruned(folders, offline_task_dir):
    from lm_eval.models.huggingface import HFLM

    dense_dir, pruned_dir = folders
    args = "trust_remote_code=True,dtype=float32,device=cpu"

    # dense: the plain `--model hf` route
    dense, dense_ll = _evaluate("hf", offline_task_dir, model_args=f"pretrained={dense_dir},{args}")
    assert 0.0 <= dense["acc,none"] <= 1.0
    assert len(dense_ll) == 8 * 4  # one log-likelihood per choice

    # pruned: the same argument string, parsed the way the CLI parses it
    lm = HFLM.create_from_arg_string(f"pretrained={pruned_dir},{args}")
    assert type(lm.model).__name__ == "DipExtLlamaForCausalLM"  # loaded via the auto_map shim (trust_remote_code)
    assert dip_ext.is_compacted(lm.model)
    assert type(lm.model.model.layers[0]).__name__ == "DipExtLlamaDecoderLayer"
    pruned, pruned_ll = _evaluate(lm, offline_task_dir)
    assert 0.0 <= pruned["acc,none"] <= 1.0
    assert len(pruned_ll) == 8 * 4 and pruned_ll != dense_ll  # the pruned weights really ran
