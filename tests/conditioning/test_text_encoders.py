"""Text encoders and the text-embedding cache, on the embedded MiniLM and tiny random FLUX
encoders."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from torch import Tensor

from fluxlab.conditioning import text_encoders
from fluxlab.conditioning.text_cache import (
    empty_caption_embeddings,
    encode_captions_cached,
    text_cache_path,
)
from fluxlab.conditioning.text_encoders import (
    FluxTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    build_text_encoder,
    minilm_model_dir,
)

CAPTIONS = ["a red apple on a table", "a smiling face with sunglasses", ""]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=16)


def test_minilm_shapes_and_zero_padding(minilm: MiniLMTextEncoder) -> None:
    tokens, pooled = minilm.encode(CAPTIONS)
    assert (minilm.context_dim, minilm.pooled_dim, minilm.name) == (384, 384, "minilm-l6-v2:len16")
    assert tokens.shape == (3, 16, 384) and pooled.shape == (3, 384)
    assert tokens.dtype == pooled.dtype == torch.float32
    mask = minilm.tokenizer(
        CAPTIONS, padding="max_length", max_length=16, return_tensors="pt"
    ).attention_mask
    assert 0 < mask[0].sum() < 16, "the first caption should leave padding to check"
    assert torch.all(tokens[mask == 0] == 0)
    assert torch.all(tokens[mask == 1].abs().sum(-1) > 0)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_minilm_captions_differ_and_batching_is_invisible(minilm: MiniLMTextEncoder) -> None:
    tokens, pooled = minilm.encode(CAPTIONS)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-2)
    assert not torch.allclose(tokens[0, 1], tokens[1, 1], atol=1e-2)
    alone_tokens, alone_pooled = minilm.encode([CAPTIONS[1]])
    torch.testing.assert_close(alone_tokens[0], tokens[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone_pooled[0], pooled[1], atol=1e-5, rtol=1e-5)


def test_minilm_truncates_long_captions(minilm: MiniLMTextEncoder) -> None:
    tokens, _ = minilm.encode(["emoji " * 100])
    assert tokens.shape == (1, 16, 384) and torch.all(tokens.abs().sum(-1) > 0)


def test_minilm_pooled_matches_sentence_transformers(minilm: MiniLMTextEncoder) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(minilm_model_dir()), device="cpu")
    expected = reference.encode(CAPTIONS, convert_to_tensor=True).cpu()
    _, pooled = minilm.encode(CAPTIONS)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)


def test_minilm_rejects_bad_input(minilm: MiniLMTextEncoder) -> None:
    with pytest.raises(ValueError, match="list of caption strings"):
        minilm.encode("a single string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        MiniLMTextEncoder(max_length=1000)
    tokens, pooled = minilm.encode([])
    assert tokens.shape == (0, 16, 384) and pooled.shape == (0, 384)


# --- FLUX T5 + CLIP, as tiny random models saved in the diffusers FLUX layout -------------------

WORDS = "a photo of cat dog red blue emoji smiling face with the and on table apple".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write_clip_tokenizer(folder: Path) -> None:
    """A byte-less CLIP BPE: every letter (alone and word-final) plus merges that build WORDS."""
    vocab: dict[str, int] = {}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in WORDS:
        current = word[0]
        for i, letter in enumerate(word[1:], start=1):
            piece = letter + "</w>" if i == len(word) - 1 else letter
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _write_t5_tokenizer(folder: Path) -> None:
    """A SentencePiece-style Unigram tokenizer with T5's <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(p, -1.0 - i) for i, p in enumerate(["▁" + w for w in WORDS] + ["▁", *LETTERS])]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "extra_ids": 0}))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flux")
    _write_clip_tokenizer(root / "clip_src")
    _write_t5_tokenizer(root / "t5_src")
    clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(
        root / "clip_src", model_max_length=77
    )
    t5_tokenizer = transformers.T5TokenizerFast.from_pretrained(root / "t5_src")
    torch.manual_seed(0)
    eos = clip_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    clip_config = transformers.CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=clip_tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos,
        pad_token_id=eos,
    )  # fmt: skip
    t5_config = transformers.T5Config(
        vocab_size=len(t5_tokenizer), d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    clip_tokenizer.save_pretrained(root / "tokenizer")
    t5_tokenizer.save_pretrained(root / "tokenizer_2")
    transformers.CLIPTextModel(clip_config).save_pretrained(root / "text_encoder")
    transformers.T5EncoderModel(t5_config).save_pretrained(root / "text_encoder_2")
    return root


@pytest.fixture(scope="module")
def flux_encoder(flux_dir: Path) -> FluxTextEncoder:
    return FluxTextEncoder(flux_dir, t5_max_length=20)


def test_flux_encoder_matches_transformers(flux_encoder: FluxTextEncoder, flux_dir: Path) -> None:
    assert (flux_encoder.context_dim, flux_encoder.pooled_dim, flux_encoder.max_length) == (
        24,
        32,
        20,
    )
    tokens, pooled = flux_encoder.encode(CAPTIONS)
    assert tokens.shape == (3, 20, 24) and pooled.shape == (3, 32)

    # The reference is diffusers' FluxPipeline recipe written out with transformers alone.
    clip_tok = transformers.CLIPTokenizer.from_pretrained(flux_dir / "tokenizer")
    t5_tok = transformers.T5TokenizerFast.from_pretrained(flux_dir / "tokenizer_2")
    clip = transformers.CLIPTextModel.from_pretrained(flux_dir / "text_encoder").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2").eval()
    clip_ids = clip_tok(
        CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    t5_ids = t5_tok(
        CAPTIONS, padding="max_length", max_length=20, truncation=True, return_tensors="pt"
    ).input_ids
    assert clip_ids[0, 0] == clip_tok.bos_token_id and (t5_ids[0] == 0).any(), (
        "captions should tokenise and pad"
    )
    with torch.no_grad():
        expected_tokens = t5(t5_ids).last_hidden_state
        expected_pooled = clip(clip_ids).pooler_output
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-6, rtol=0)
    assert not torch.allclose(pooled[0], pooled[1]) and not torch.allclose(tokens[0], tokens[1])


def test_flux_encoder_matches_diffusers_encode_prompt(
    flux_encoder: FluxTextEncoder, flux_dir: Path
) -> None:
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.FluxPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(flux_dir / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(flux_dir / "tokenizer"),
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2"),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(flux_dir / "tokenizer_2"),
    )  # fmt: skip
    with torch.no_grad():
        expected_tokens, expected_pooled, _ = pipe.encode_prompt(
            CAPTIONS, prompt_2=None, device=torch.device("cpu"), max_sequence_length=20
        )
    tokens, pooled = flux_encoder.encode(CAPTIONS)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-6, rtol=0)


def test_flux_encoder_truncates_to_t5_max_length(flux_encoder: FluxTextEncoder) -> None:
    tokens, pooled = flux_encoder.encode(["a photo of a cat " * 40])
    assert tokens.shape == (1, 20, 24) and pooled.shape == (1, 32) and torch.isfinite(tokens).all()


def test_flux_encoder_missing_subfolder_names_path_and_layout(
    flux_dir: Path, tmp_path: Path
) -> None:
    partial = tmp_path / "partial"
    for sub in ("tokenizer", "text_encoder", "tokenizer_2"):
        (partial / sub).mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"partial lacks text_encoder_2/.*tokenizer_2/ \+ text_encoder_2/"
    ):
        FluxTextEncoder(partial)


def test_flux_encoder_bad_path_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-folder"
    with pytest.raises(
        ValueError, match=r"no-such-folder does not exist .*HF_HUB_OFFLINE.*tokenizer/"
    ):
        FluxTextEncoder(missing)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        FluxTextEncoder(tmp_path / "weights.bin")


def test_build_text_encoder(
    flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build_text_encoder(str(flux_dir), max_length=12)
    assert isinstance(built, FluxTextEncoder) and built.max_length == 12
    # Routing only: the MiniLM load itself is covered by the module fixture above.
    monkeypatch.setattr(
        text_encoders, "MiniLMTextEncoder", lambda max_length, device: (max_length, device)
    )
    assert build_text_encoder("MiniLM", max_length=None) == (32, "cpu")
    assert build_text_encoder("minilm", max_length=8, device="meta") == (8, "meta")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("t5-xxl", str(tmp_path / "missing"), "someone/some-model"):
        with pytest.raises(ValueError, match="'minilm'.*diffusers FLUX layout"):
            build_text_encoder(spec, max_length=None)


# --- the cache, on a fake encoder that counts its calls -----------------------------------------


class CountingEncoder(TextEncoder):
    """Each caption maps to its own fixed random embedding, whatever batch it arrives in."""

    def __init__(self, name: str = "counting") -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.name, self.context_dim, self.pooled_dim, self.max_length = name, 6, 5, 4
        self.calls: list[list[str]] = []

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        self.calls.append(list(captions))
        pairs = [self._one(c) for c in captions]
        return torch.stack([t for t, _ in pairs]), torch.stack([p for _, p in pairs])

    def _one(self, caption: str) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.name}|{caption}".encode()))
        return torch.randn(self.max_length, self.context_dim, generator=g), torch.randn(
            self.pooled_dim, generator=g
        )


def test_cache_dedupes_batches_and_keeps_order(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    captions = ["b", "a", "c", "a", "", "b", "d"]
    tokens, pooled = encode_captions_cached(
        encoder, captions, tmp_path, batch_size=2, show_progress=False
    )
    assert [len(batch) for batch in encoder.calls] == [2, 2, 1]
    assert sorted(c for batch in encoder.calls for c in batch) == ["", "a", "b", "c", "d"]
    assert tokens.shape == (7, 4, 6) and pooled.shape == (7, 5)
    assert tokens.dtype == pooled.dtype == torch.float32
    for i, caption in enumerate(captions):
        want_tokens, want_pooled = encoder._one(caption)
        torch.testing.assert_close(tokens[i], want_tokens, atol=2e-3, rtol=1e-3)  # float16 storage
        torch.testing.assert_close(pooled[i], want_pooled, atol=0, rtol=0)  # float32 storage


def test_cache_second_call_loads_without_encoding(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    first = encode_captions_cached(encoder, ["x", "y", "x"], tmp_path, show_progress=False)
    assert len(encoder.calls) == 1
    path = text_cache_path(encoder, ["y", "x"], tmp_path)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    second = encode_captions_cached(encoder, ["x", "y", "x"], tmp_path, show_progress=False)
    reordered = encode_captions_cached(encoder, ["y", "x"], tmp_path, show_progress=False)
    assert len(encoder.calls) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(reordered[0], first[0][[1, 0]])


def test_cache_misses_on_other_captions_encoder_or_corrupt_file(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    encode_captions_cached(encoder, ["x"], tmp_path, show_progress=False)
    encode_captions_cached(encoder, ["x", "z"], tmp_path, show_progress=False)
    assert len(encoder.calls) == 2
    other = CountingEncoder(name="other")
    tokens, _ = encode_captions_cached(other, ["x"], tmp_path, show_progress=False)
    assert len(other.calls) == 1 and torch.allclose(tokens[0], other._one("x")[0], atol=2e-3)
    text_cache_path(encoder, ["x"], tmp_path).write_bytes(b"not a safetensors file")
    encode_captions_cached(encoder, ["x"], tmp_path, show_progress=False)
    assert len(encoder.calls) == 3
    encode_captions_cached(encoder, ["x"], tmp_path, show_progress=False)
    assert len(encoder.calls) == 3, "the re-encoded file should have replaced the corrupt one"


def test_cache_float32_storage_is_exact_and_overflow_is_caught(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    tokens, _ = encode_captions_cached(
        encoder, ["q"], tmp_path, show_progress=False, storage_dtype=torch.float32
    )
    assert torch.equal(tokens[0], encoder._one("q")[0])
    encoder._one = lambda caption: (torch.full((4, 6), 1e6), torch.zeros(5))  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="storage_dtype"):
        encode_captions_cached(encoder, ["huge"], tmp_path, show_progress=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_caption_embeddings(tmp_path: Path, flux_encoder: FluxTextEncoder) -> None:
    tokens, pooled = empty_caption_embeddings(flux_encoder)
    assert tokens.shape == (1, 20, 24) and pooled.shape == (1, 32)
    direct_tokens, direct_pooled = flux_encoder.encode([""])
    assert torch.equal(tokens, direct_tokens) and torch.equal(pooled, direct_pooled)
    encoder = CountingEncoder()
    cached_tokens, _ = empty_caption_embeddings(encoder, cache_dir=tmp_path)
    again_tokens, _ = empty_caption_embeddings(encoder, cache_dir=tmp_path)
    assert encoder.calls == [[""]] and torch.equal(cached_tokens, again_tokens)
    assert torch.allclose(cached_tokens[0], encoder._one("")[0], atol=2e-3)
