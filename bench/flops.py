"""Model FLOPs of a training step: the numerator of MFU in the benchmark."""

from __future__ import annotations

from torch import nn

from pfreeze import Geometry, describe_params, first_trained_block


def train_flops(layers: int, width: int, seq: int, tokens: int, block_params: int,
                head_params: int, first_trainable: int | None, trainable_params: int,
                cached: bool = False) -> float:
    """Model FLOPs of one training step, the MFU numerator (norms, softmax, biases ignored).

    L layers of attention width d (heads x head_dim), N = batch x T tokens; P_block: matrix
    elements of one block; P_head: vocab x d (even if tied); first_trainable f: lowest block
    with a trainable tensor (0 if the embedding trains, L if only head/final norm, None: none).
    forward   2 (L P_block + P_head) N + attention: QK^T and AV cost 2 T d per token and block
              each, 4 L T d N, which the causal mask halves to 2 L T d N (FlashAttention's count)
    backward  activation gradients (dX = dY W^T: 2 P N; attention: twice its forward) through
              blocks f..L-1 and the head, plus weight gradients (dW = X^T dY: 2 P N) of the
              trainable matrices only. All trainable: 2 x forward. A frozen arm is overcounted by
              the q/k/v input gradient of block f, which autograd skips.
    cached    with the frozen prefix's outputs reused (pfreeze's prefix cache), the forward of
              blocks 0..f-1 is not run: the FLOPs the step executes. Without `cached`, the
              FLOPs of the training the arm does, however it is computed (the bench's MFU).
    """
    attn = 2 * seq * width * tokens  # causal attention of one block, forward
    fwd = 2 * (layers * block_params + head_params) * tokens + layers * attn
    if first_trainable is None:
        return float(fwd)
    up = layers - first_trainable
    act = 2 * (up * block_params + head_params) * tokens + 2 * up * attn
    skipped = first_trainable * (2 * block_params * tokens + attn) if cached else 0
    return float(fwd - skipped + act + 2 * trainable_params * tokens)


def model_flops(model: nn.Module, family: str, trainable: set[str], batch: int, seq: int,
                cached: bool = False, adapters_from: int | None = None) -> float:
    """train_flops with the counts read off `model` and the names that train. An adapter arm
    (LoRA) trains none of the model's own tensors: `adapters_from` is its lowest adapted block,
    where backward starts (the adapters' own FLOPs, r/d of the matrices', are left out)."""
    infos, g = describe_params(model, family), Geometry.of(model)
    mats = {n: p.numel() for n, p in model.named_parameters() if p.ndim >= 2}
    blocks = sum(v for n, v in mats.items() if infos[n].layer is not None)
    head = model.get_output_embeddings().weight.numel()
    head_trains = any(infos[n].rule.role == "head" or infos[n].tied for n in trainable)
    # the prefix cache's own rule: where backward stops is where a cached step starts
    first = first_trained_block(trainable, infos, g.n_layers) if trainable else adapters_from
    train_mats = sum(v for n, v in mats.items() if n in trainable and infos[n].layer is not None)
    return train_flops(g.n_layers, g.n_heads * g.head_dim, seq, batch * seq,
                       blocks // g.n_layers, head, first, train_mats + head * head_trains,
                       cached)
