"""BLIP-2 task models, each mirroring the transformers class of the same name: same submodule names
(so the checkpoint's keys load one to one) and the same computation, without generation machinery
(decoding loops live in blip_runtime and run over exported graphs).

Shapes: B batch, N image tokens, Q query tokens, S text tokens, D_q Q-Former width (768),
D_lm the language model's width, V its vocabulary, E the ITC width (image_text_hidden_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Blip2Config
from .qformer import Blip2QFormerModel, Blip2TextEmbeddings
from .vision import Blip2VisionModel

# Kept in fp32 whatever dtype the rest is loaded in (transformers' _keep_in_fp32_modules).
KEEP_FP32 = ("query_tokens", "qformer")


def language_model(cfg: Blip2Config) -> nn.Module:
    if cfg.text_config.is_encoder_decoder:
        from .t5 import T5ForConditionalGeneration

        return T5ForConditionalGeneration(cfg.text_config)
    from .opt import OptForCausalLM

    return OptForCausalLM(cfg.text_config)


class _QueryImage(nn.Module):
    """vision_model + query_tokens + qformer: what every BLIP-2 model but the text-only one has."""

    def _init_query_image(self, cfg: Blip2Config) -> None:
        self.config = cfg
        self.vision_model = Blip2VisionModel(cfg.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(cfg.qformer_config)

    def query_output(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds [B, N, D_v] -> Q-Former query output float32 [B, Q, D_q]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D_q)
        return self.qformer(queries, queries.shape[1], encoder_hidden_states=image_embeds)


class Blip2ForConditionalGeneration(_QueryImage):
    """Image -> ViT-g -> Q-Former over the learned queries -> language_projection -> the LM's input
    embeddings (OPT: a prefix of the decoder; Flan-T5: of the encoder).

    Where the projected queries go: with `image_token_index` set, they replace the `<image>` tokens
    that the processor put in input_ids (Q of them per row, before BOS); without it (the legacy
    convention), they are concatenated before the text embeddings, with attention-mask ones.
    """

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self._init_query_image(cfg)
        self.language_projection = nn.Linear(cfg.qformer_config.hidden_size, cfg.text_config.hidden_size)
        self.language_model = language_model(cfg)

    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> projected queries [B, Q, D_lm], in the LM's dtype (what
        transformers' get_image_features returns as pooler_output)."""
        image_embeds, _ = self.vision_model(pixel_values)
        query = self.query_output(image_embeds).to(image_embeds.dtype)  # the Q-Former ran in fp32
        return self.language_projection(query)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, S] -> the LM's token embeddings [B, S, D_lm]."""
        return self.language_model.embed(input_ids)

    def merge(self, prefix: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's inputs: prefix [B, Q, D_lm], input_ids/attention_mask int64 [B, S]
        -> (inputs_embeds [B, S', D_lm], attention_mask [B, S']), S' = S with image tokens, Q + S legacy."""
        embeds = self.embed(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token = self.config.image_token_index
        if token is None:
            ones = torch.ones(input_ids.shape[0], prefix.shape[1], dtype=attention_mask.dtype, device=input_ids.device)
            return torch.cat([prefix.to(embeds.dtype), embeds], dim=1), torch.cat([ones, attention_mask], dim=1)
        is_image = input_ids == token  # (B, S)
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            counts = is_image.sum(dim=1)
            if bool((counts != prefix.shape[1]).any()):
                raise ValueError(f"input_ids: each row needs exactly {prefix.shape[1]} image tokens "
                                 f"(id {token}), got {counts.tolist()}")
        # The i-th image token of a row takes the row's i-th query: masked_scatter's order when every
        # row has Q of them, written as a gather so that it traces.
        index = (is_image.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, S); ONNX CumSum takes no bool
        gathered = prefix.gather(1, index[..., None].expand(-1, -1, prefix.shape[2]))  # (B, S, D_lm)
        return torch.where(is_image[..., None], gathered.to(embeds.dtype), embeds), attention_mask

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As transformers' forward -> logits float32: OPT [B, S', V] over the whole merged sequence;
        T5 [B, S_dec, V] for decoder_input_ids [B, S_dec]."""
        embeds, mask = self.merge(self.image_prefix(pixel_values), input_ids, attention_mask)
        lm = self.language_model
        if self.config.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("decoder_input_ids: required for a T5 language model")
            logits, _ = lm.decode(decoder_input_ids, mask, lm.cross_kv(lm.encode(embeds, mask)))
            return logits
        logits, _ = lm(embeds, mask, opt_position_ids(mask))
        return logits


def opt_position_ids(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """OPT's positions as transformers derives them: attention_mask int64 [B, P+S] -> [B, S],
    the count of real tokens before each one (padding gets -1; it is masked)."""
    positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1
    return positions[:, past_length:].long()


class Blip2Model(Blip2ForConditionalGeneration):
    """The features model: the same modules as Blip2ForConditionalGeneration (forward included),
    plus transformers' get_*_features."""

    def get_image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the vision model's (last_hidden_state [B, N, D_v], pooler_output [B, D_v]), as
        transformers 5 returns them."""
        return self.vision_model(pixel_values)

    def get_qformer_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """-> the Q-Former's last hidden state float32 [B, Q, D_q]."""
        image_embeds, _ = self.vision_model(pixel_values)
        return self.query_output(image_embeds)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> the LM's text states [B, S, D_lm]: OPT's decoder last hidden state, or T5's encoder output."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm = self.language_model
        if self.config.is_encoder_decoder:
            return lm.encode(lm.embed(input_ids), attention_mask)
        hidden, _ = lm.hidden(lm.embed(input_ids), attention_mask, opt_position_ids(attention_mask))
        return hidden


class Blip2ForImageTextRetrieval(_QueryImage):
    """ITM: the Q-Former over [queries; text] cross-attending to the image, the 2-way head averaged
    over the query positions. ITC: projected, normalized query outputs against the projected,
    normalized text [CLS], the best query's similarity per pair."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self._init_query_image(cfg)
        self.embeddings = Blip2TextEmbeddings(cfg.qformer_config)
        D, E = cfg.qformer_config.hidden_size, cfg.image_text_hidden_size
        self.vision_projection = nn.Linear(D, E)
        self.text_projection = nn.Linear(D, E)
        self.itm_head = nn.Linear(D, 2)

    def _strip_image_tokens(self, input_ids, attention_mask):
        """With image tokens, the processor put Q of them before the text: the Q-Former takes the text."""
        if self.config.image_token_index is None:
            return input_ids, attention_mask
        Q = self.config.num_query_tokens
        return input_ids[:, Q:], None if attention_mask is None else attention_mask[:, Q:]

    def itm_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text input_ids/attention_mask int64 [B, S] (no image tokens) -> [B, 2] (index 1 = match)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(input_ids.shape[0], self.config.num_query_tokens, dtype=attention_mask.dtype,
                          device=input_ids.device)
        return self._itm(pixel_values, input_ids, torch.cat([ones, attention_mask], dim=1))

    def _itm(self, pixel_values, input_ids, mask) -> torch.Tensor:
        """mask int64 [B, Q+S] over queries and text -> [B, 2]."""
        image_embeds, _ = self.vision_model(pixel_values)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D_q)
        Q = queries.shape[1]
        states = self.qformer(self.embeddings(input_ids, queries), Q, mask, image_embeds)  # (B, Q+S, D_q)
        states = states.to(self.itm_head.weight.dtype)
        return self.itm_head(states[:, :Q]).mean(dim=1)

    def image_feat(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """-> L2-normalized per-query features [B, Q, E]."""
        image_embeds, _ = self.vision_model(pixel_values)
        query = self.query_output(image_embeds).to(self.vision_projection.weight.dtype)
        return F.normalize(self.vision_projection(query), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text only (no image, no queries) -> L2-normalized [B, E] from the first token."""
        states = self.qformer(self.embeddings(input_ids), 0, attention_mask)  # (B, S, D_q)
        states = states.to(self.text_projection.weight.dtype)
        return F.normalize(self.text_projection(states[:, 0]), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_image_text_matching_head: bool = False) -> torch.Tensor:
        """As transformers' logits_per_image: ITM [B, 2], or ITC [B_img, B_txt]. input_ids as the
        processor gives them (with Q image tokens in front when image_token_index is set)."""
        if use_image_text_matching_head and self.config.image_token_index is not None and attention_mask is not None:
            # transformers keeps the mask over the image tokens as the queries' mask
            return self._itm(pixel_values, input_ids[:, self.config.num_query_tokens:], attention_mask)
        input_ids, text_mask = self._strip_image_tokens(input_ids, attention_mask)
        if use_image_text_matching_head:
            return self.itm_logits(pixel_values, input_ids, text_mask)
        sims = self.image_feat(pixel_values) @ self.text_feat(input_ids, text_mask).t()  # (B_img, Q, B_txt)
        return sims.max(dim=1).values


class Blip2TextModelWithProjection(nn.Module):
    """Text features for retrieval: the Q-Former in text-only mode, every token projected."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size))
        self.embeddings = Blip2TextEmbeddings(cfg.qformer_config)
        self.qformer = Blip2QFormerModel(cfg.qformer_config)
        self.text_projection = nn.Linear(cfg.qformer_config.hidden_size, cfg.image_text_hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text_embeds L2-normalized [B, S, E], last_hidden_state float32 [B, S, D_q])."""
        states = self.qformer(self.embeddings(input_ids, position_ids=position_ids), 0, attention_mask)
        embeds = self.text_projection(states.to(self.text_projection.weight.dtype))
        return F.normalize(embeds, dim=-1), states


class Blip2VisionModelWithProjection(_QueryImage):
    """Image features for retrieval: the projected, normalized query outputs."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self._init_query_image(cfg)
        self.vision_projection = nn.Linear(cfg.qformer_config.hidden_size, cfg.image_text_hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_embeds L2-normalized [B, Q, E], the vision last_hidden_state [B, N, D_v])."""
        image_embeds, _ = self.vision_model(pixel_values)
        query = self.query_output(image_embeds).to(self.vision_projection.weight.dtype)
        return F.normalize(self.vision_projection(query), dim=-1), image_embeds


MODEL_CLASSES = {
    "Blip2ForConditionalGeneration": Blip2ForConditionalGeneration,
    "Blip2Model": Blip2Model,
    "Blip2ForImageTextRetrieval": Blip2ForImageTextRetrieval,
    "Blip2TextModelWithProjection": Blip2TextModelWithProjection,
    "Blip2VisionModelWithProjection": Blip2VisionModelWithProjection,
}
