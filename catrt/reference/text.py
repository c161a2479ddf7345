"""A word-level tokenizer and a tiny transformer text encoder for the reference captions.

SD3's CLIP/T5 encoders cannot be downloaded here and would dwarf the reference model, so
the reference pipeline trains its own encoder jointly with the denoiser. It returns what
SD3's encoders return: per-token embeddings and one pooled vector per prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from catrt.reference import data

logger = logging.getLogger(__name__)

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
SPECIAL_TOKENS = (PAD, UNK, CLS)


def caption_vocabulary() -> list[str]:
    """Every word a `data` caption can contain, after the special tokens (ids 0, 1, 2)."""
    words = {"a", "in", "the", "on", "background"}
    for name in (*data.SHAPES, *data.COLOURS, *data.BACKGROUNDS, *data.SIZES, *data.POSITIONS):
        words.update(name.split())
    return [*SPECIAL_TOKENS, *sorted(words)]


def word_tokenizer(vocab: Sequence[str], max_length: int = 16) -> PreTrainedTokenizerFast:
    """Lower-cased words (runs of a-z; anything else separates them) -> ids, with a leading <cls>.

    Built from the `tokenizers` library's word-level model, so the pipeline's `save_pretrained` writes it
    and diffusers' `from_pretrained` reads it back like any tokenizer. The <cls> token means even the empty
    (unconditional) prompt has one real token to attend to and to pool from.
    """
    if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"vocab must start with {SPECIAL_TOKENS}, got {list(vocab[:3])}")
    model = Tokenizer(WordLevel({word: index for index, word in enumerate(vocab)}, unk_token=UNK))
    model.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")])
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, vocab.index(CLS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=model, model_max_length=max_length, pad_token=PAD, unk_token=UNK, cls_token=CLS,
    )


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: str | Sequence[str]) -> torch.Tensor:
    """(B, model_max_length) int64 ids of the prompts, truncated (after <cls>) and padded, as the encoder reads them."""
    batch = [texts] if isinstance(texts, str) else list(texts)
    length = tokenizer.model_max_length
    for text, ids in zip(batch, tokenizer(batch, verbose=False).input_ids, strict=True):
        if len(ids) > length:
            logger.warning("prompt truncated to %d tokens: %r", length, text)
    encoded = tokenizer(batch, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return encoded.input_ids


class ReferenceTextEncoder(ModelMixin, ConfigMixin):
    """Pre-norm transformer over word ids: token embeddings for joint attention plus a pooled vector."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32,
        max_length: int = 16,
        width: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        joint_attention_dim: int = 64,
        pooled_projection_dim: int = 64,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        layer = nn.TransformerEncoderLayer(
            width, num_heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.token_projection = nn.Linear(width, joint_attention_dim)
        self.pooled_projection = nn.Linear(width, pooled_projection_dim)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> ((B, T, joint_attention_dim) tokens, (B, pooled_projection_dim) pooled).

        Padding is masked inside the encoder; the pooled vector is the <cls> (first) token.
        """
        padding = input_ids == SPECIAL_TOKENS.index(PAD)
        hidden = self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]
        hidden = self.final_norm(self.encoder(hidden, src_key_padding_mask=padding))
        return self.token_projection(hidden), self.pooled_projection(hidden[:, 0])
