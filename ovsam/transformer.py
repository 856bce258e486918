"""SAM's two-way transformer, computed for few prompt tokens against many image tokens.

In the decoder a handful of prompt tokens (T = 4 for a point or a box: label, mask and two prompt tokens) attend
to the image's 4,096 tokens and back. segment_anything's `Attention` projects both sides to its internal width
D (128 in the released decoder): for the image side that is 4,096 x 256 x 128 MACs per prompt and per
projection, most of the transformer's cost when automatic mode decodes 1,024 grid prompts per image. Matrix
products reassociate, so with few tokens on one side (fewer than a head has channels, d = D / heads) the
projections of the long side fold into the short side, whose projected tokens are few:

* logits: q_h . (W_h x + b_h) = (W_h^T q_h) . x + q_h . b_h;
* values: sum_j p_j (W_h x_j + b_h) = W_h (sum_j p_j x_j) + b_h, as the weights p_j sum to 1;
* output projection: W_o concat_h(sum_t p_ht v_ht) + b_o = sum_h sum_t p_ht (W_o,h v_ht + b_o / heads), with
  W_o,h the columns of head h; the residual around the attention is added by the same matrix product.

An attention's two products on the image side (keys and values, or queries and output) then cost
2 x heads x T x 256 MACs per image token instead of 2 x 256 x 128 (a quarter for T = 4), and no [N, 4,096, 256]
tensor is made for the bias or the residual. A side shared by all
prompts (batch 1: the image in the first layer) is projected once instead, as that is cheaper still. The result
is segment_anything's up to float rounding; the parameters (and state-dict keys) are its own, so checkpoints
load unchanged and training takes the same path.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer


class FoldedTwoWayTransformer(TwoWayTransformer):
    """segment_anything's `TwoWayTransformer` (same arguments, modules and result), computed as above."""

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding: [B_i, C, h, w] with B_i = N, or 1 shared by all prompts; image_pe: [1, C, h, w];
        point_embedding: [N, T, C]. Returns the prompt tokens [N, T, C] and the image tokens [N, h * w, C]."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = _block(layer, queries, keys, point_embedding, key_pe)
        queries = attend(self.final_attn_token_to_image, queries + point_embedding, keys + key_pe, keys,
                         residual=queries)
        return self.norm_final_attn(queries), keys


def _block(layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
           key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayAttentionBlock.forward`: token self-attention, tokens to image, MLP, image to tokens."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    keys_with_pe = keys + key_pe  # the keys do not change until the image-to-token attention: added once
    queries = layer.norm2(attend(layer.cross_attn_token_to_image, queries + query_pe, keys_with_pe, keys,
                                 residual=queries))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = attend(layer.cross_attn_image_to_token, keys_with_pe, queries + query_pe, queries, residual=keys)
    return queries, layer.norm4(keys)


def attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           residual: torch.Tensor) -> torch.Tensor:
    """residual + attention(q, k, v) of a segment_anything `Attention`, folding the long side's projections.

    q: [B_q, N_q, C]; k, v: [B_k, N_k, C]; residual: [B_r, N_q, C]; a batch of 1 is broadcast against the
    others, B = max of them. Returns [B, N_q, C].
    """
    head_dim = attention.internal_dim // attention.num_heads
    few_queries, few_keys = q.shape[1] < head_dim, k.shape[1] < head_dim
    if few_keys and not few_queries:
        return _few_keys(attention, q, k, v, residual)
    if few_queries and not few_keys:
        return residual + _few_queries(attention, q, k, v)
    return residual + attention(q=q, k=k, v=v)


def _head_weights(attention: Attention, linear: torch.nn.Linear) -> torch.Tensor:
    """A [D, C] projection weight as [heads, d, C]."""
    return linear.weight.reshape(attention.num_heads, -1, attention.embedding_dim)


def _few_queries(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Few queries against many keys; the output is as small as the queries."""
    heads, head_dim = attention.num_heads, attention.internal_dim // attention.num_heads
    batch, nq = max(q.shape[0], k.shape[0]), q.shape[1]
    queries = attention.q_proj(q).expand(batch, -1, -1).reshape(batch, nq, heads, head_dim)
    if k.shape[0] == 1:  # keys shared by all prompts: projected once, attended per head
        keys = attention.k_proj(k[0]).reshape(-1, heads, head_dim).permute(1, 2, 0)  # [h, d, nk]
        values = attention.v_proj(v[0]).reshape(-1, heads, head_dim).transpose(0, 1)  # [h, nk, d]
        logits = torch.bmm(queries.permute(2, 0, 1, 3).reshape(heads, batch * nq, head_dim), keys)
        weights = torch.softmax(logits / math.sqrt(head_dim), dim=-1)  # small: [h, B * nq, nk]
        out = torch.bmm(weights, values).reshape(heads, batch, nq, head_dim).permute(1, 2, 0, 3)
        return attention.out_proj(out.reshape(batch, nq, heads * head_dim))
    c = k.shape[2]
    # W_k,h^T q_h for each head: [B, h * nq, C]. The key bias term q_h . b_k,h cancels in the softmax; it is
    # added anyway (it costs nothing) so that the bias gets its zero gradient: DDP expects one for every parameter.
    # The softmax scale goes on the few queries, not on the [B, h * nq, nk] logits.
    queries = queries / math.sqrt(head_dim)
    folded = torch.einsum("bqhd,hdc->bhqc", queries, _head_weights(attention, attention.k_proj))
    key_bias = torch.einsum("bqhd,hd->bhq", queries, attention.k_proj.bias.reshape(heads, head_dim))
    logits = torch.baddbmm(key_bias.reshape(batch, heads * nq, 1), folded.reshape(batch, heads * nq, c),
                           k.transpose(1, 2))
    weights = torch.softmax(logits, dim=-1)  # [B, h * nq, nk]
    pooled = torch.bmm(weights, v).reshape(batch, heads, nq, c)  # sum_j p_j v_j, in the model width
    values = torch.einsum("bhqc,hdc->bqhd", pooled, _head_weights(attention, attention.v_proj))
    values = values + attention.v_proj.bias.reshape(heads, head_dim)
    return attention.out_proj(values.reshape(batch, nq, heads * head_dim))


def _few_keys(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              residual: torch.Tensor) -> torch.Tensor:
    """Many queries against few keys: the queries and the output stay in the model width C.

    The logits are laid out [B, nq, nk, heads] so that the softmax runs over a middle axis: over a last axis of
    4 keys it is several times slower on a CPU.
    """
    heads, head_dim = attention.num_heads, attention.internal_dim // attention.num_heads
    batch, (nq, c) = max(q.shape[0], k.shape[0]), q.shape[1:]
    k, v = k.expand(batch, -1, -1), v.expand(batch, -1, -1)
    nk = k.shape[1]
    # The softmax scale goes on the few keys, not on the [B, nq, nk, heads] logits.
    keys = attention.k_proj(k).reshape(batch, nk, heads, head_dim) / math.sqrt(head_dim)
    if q.shape[0] == batch:
        folded = torch.einsum("bkhd,hdc->bkhc", keys, _head_weights(attention, attention.q_proj))
        query_bias = torch.einsum("bkhd,hd->bkh", keys, attention.q_proj.bias.reshape(heads, head_dim))
        logits = torch.bmm(q, folded.reshape(batch, nk * heads, c).transpose(1, 2))
        logits = logits.reshape(batch, nq, nk, heads) + query_bias[:, None]
    else:  # queries shared by all prompts: projected once
        queries = attention.q_proj(q[0]).reshape(nq, heads, head_dim)
        logits = torch.einsum("qhd,bkhd->bqkh", queries, keys)
    weights = torch.softmax(logits, dim=2).reshape(batch, nq, nk * heads)
    values = attention.v_proj(v).reshape(batch, nk, heads, head_dim)
    # W_o,h v_h + b_o / heads: each head's values in the output width, [B, nk * heads, C]; the weights of each
    # head sum to 1 over the keys, so the product adds b_o once.
    out_weight = attention.out_proj.weight.reshape(attention.embedding_dim, heads, head_dim)
    projected = torch.einsum("bkhd,chd->bkhc", values, out_weight) + attention.out_proj.bias / heads
    return torch.baddbmm(residual, weights, projected.reshape(batch, nk * heads, c))
