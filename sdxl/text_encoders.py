"""SDXL's dual text conditioning: CLIP ViT-L (`text_encoder`) and OpenCLIP ViT-bigG (`text_encoder_2`).

For a prompt SDXL uses
- the per-token context (B, 77, 2048): the *penultimate* hidden states of both encoders (the input of
  their last layer, without the final LayerNorm), CLIP-L's 768 features first, then bigG's 1280;
- the pooled vector (B, 1280): bigG's final-LayerNorm state at the end-of-text token, through its
  bias-free text projection. It joins the time ids in the UNet's added conditioning.
Both encoders are frozen; transformers provides them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

log = logging.getLogger(__name__)


class SDXLTextEncoder(nn.Module):
    """Both tokenizers and both text encoders, frozen; `encode(prompts) -> (context, pooled)`."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.warned: set[str] = set()  # prompts already reported as truncated

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        force_zeros_for_empty_prompt: bool = True,
    ) -> SDXLTextEncoder:
        """From a diffusers-layout SDXL folder. Default dtype: fp16 on CUDA, fp32 on the CPU."""
        folder = Path(folder)
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        return cls(
            CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype).to(device),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype).to(
                device
            ),
            force_zeros_for_empty_prompt,
        )

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder_2.dtype

    def _tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        """(B, 77) ids; longer prompts keep BOS, the first 75 tokens and EOS."""
        n = tokenizer.model_max_length
        ids = tokenizer(
            prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        )
        return ids.input_ids.to(self.device)

    def _warn_truncated(self, prompts: list[str]) -> None:
        """One warning per prompt that is longer than 77 tokens, the first time it is seen (a
        training caption comes back every epoch). Both tokenizers split text the same way, so the
        first one counts; verbose=False keeps transformers from adding its own warning."""
        n = self.tokenizer.model_max_length
        for prompt in set(prompts) - self.warned:
            length = len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)
            if length > n:
                self.warned.add(prompt)
                log.warning(
                    "prompt truncated to %d tokens, %d dropped: %r",
                    n,
                    length - n,
                    prompt[:60] + "...",
                )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, 77, 768 + 1280) and pooled (B, 1280) for a list of prompts."""
        self._warn_truncated(prompts)
        ids_1 = self._tokenize(self.tokenizer, prompts)
        ids_2 = self._tokenize(self.tokenizer_2, prompts)
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        # hidden_states[-2]: the penultimate layer's output, as SDXL was trained (no final norm).
        context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return context.to(self.dtype), out_2.text_embeds.to(self.dtype)

    def encode_negative(
        self, negative_prompts: list[str] | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional side of classifier-free guidance. With no negative prompt SDXL uses all
        zeros (`force_zeros_for_empty_prompt`), not the encoded empty string."""
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            ctx_dim = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
            pooled_dim = self.text_encoder_2.config.projection_dim
            n = self.tokenizer.model_max_length
            return (
                torch.zeros(batch, n, ctx_dim, device=self.device, dtype=self.dtype),
                torch.zeros(batch, pooled_dim, device=self.device, dtype=self.dtype),
            )
        return self.encode(negative_prompts if negative_prompts is not None else [""] * batch)
