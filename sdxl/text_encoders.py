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
import math
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

log = logging.getLogger(__name__)

CHUNK = 75  # text tokens per chunk: with BOS and EOS, the encoders' 77 positions


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

    def chunks_needed(self, prompts: list[str]) -> int:
        """How many 75-token chunks the longest prompt fills (at least one)."""
        lengths = [len(ids) for ids in self._text_ids(self.tokenizer, prompts)]
        return max([1, *(math.ceil(n / CHUNK) for n in lengths)])

    def _text_ids(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> list[list[int]]:
        """The prompts' token ids without BOS and EOS (verbose=False: transformers would warn about
        lengths over 77, which chunking handles)."""
        return tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids

    def _tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str], chunks: int) -> torch.Tensor:
        """(B * chunks, 77) ids: each prompt cut into `chunks` pieces of 75 tokens, each piece as
        BOS + tokens + EOS + padding, the way the encoders saw text in training. A chunk past the
        end of the prompt is the empty prompt's; tokens past the last chunk are dropped."""
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = []
        for prompt, ids in zip(prompts, self._text_ids(tokenizer, prompts)):
            if len(ids) > CHUNK * chunks and prompt not in self.warned:
                self.warned.add(prompt)  # once per prompt: a training caption comes back each epoch
                dropped = len(ids) - CHUNK * chunks
                log.warning(
                    "prompt truncated to %d tokens, %d dropped: %r",
                    CHUNK * chunks + 2,
                    dropped,
                    prompt[:60] + "...",
                )
            for c in range(chunks):
                piece = ids[c * CHUNK : (c + 1) * CHUNK]
                rows.append([bos, *piece, eos] + [pad] * (CHUNK - len(piece)))
        return torch.tensor(rows, device=self.device)

    def encode(
        self, prompts: list[str], chunks: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, chunks * 77, 768 + 1280) and pooled (B, 1280) for a list of prompts.

        Prompts longer than 75 tokens are encoded in chunks of 75 (each with its own BOS and EOS)
        and the chunks' contexts concatenated, as ComfyUI and AUTOMATIC1111 do; the pooled vector
        comes from the first chunk. `chunks` fixes their number (training, --max_token_length);
        by default there are as many as the longest prompt needs, so a prompt of up to 75 tokens
        gives exactly the one-chunk encoding of the diffusers pipeline. Gradients flow only into
        adapters a run trains (--train_text_encoder): the encoders' own weights are frozen."""
        chunks = chunks or self.chunks_needed(prompts)
        ids_1 = self._tokenize(self.tokenizer, prompts, chunks)
        ids_2 = self._tokenize(self.tokenizer_2, prompts, chunks)
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        # hidden_states[-2]: the penultimate layer's output, as SDXL was trained (no final norm).
        context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        context = context.reshape(len(prompts), -1, context.shape[-1])  # (B, chunks * 77, 2048)
        pooled = out_2.text_embeds.reshape(len(prompts), chunks, -1)[:, 0]  # the first chunk's
        return context.to(self.dtype), pooled.to(self.dtype)

    def encode_negative(
        self, negative_prompts: list[str] | None, batch: int, chunks: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional side of classifier-free guidance, as long as the prompts' context
        (`chunks`). With no negative prompt SDXL uses all zeros (`force_zeros_for_empty_prompt`),
        not the encoded empty string."""
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            ctx_dim = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
            pooled_dim = self.text_encoder_2.config.projection_dim
            n = chunks * self.tokenizer.model_max_length
            return (
                torch.zeros(batch, n, ctx_dim, device=self.device, dtype=self.dtype),
                torch.zeros(batch, pooled_dim, device=self.device, dtype=self.dtype),
            )
        return self.encode(negative_prompts or [""] * batch, chunks)
