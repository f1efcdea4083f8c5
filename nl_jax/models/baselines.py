"""The papers' linear-recurrent baselines as presets of the one token-clock engine.

Nested Learning reads every one of these token mixers as an associative
memory: one level, differing only in its objective, update rule, gates and
whether a token reads the memory before or after its own write.  Each class
below is Hope's mixer (``models/self_modifying.SelfModifyingTitans``) with a
preset of engine options and no recurrence of its own.  Per head (head dim
D), all share: plain projections with a short causal convolution (window
``conv_window``, as the originals) for q, k, v; q and k L2-normalised; a
linear memory W_t (D x D, initial state an outer-level parameter) read after
the token's write, ``o_t = W_t q_t``; per-token gates from plain projections,
``beta_t = sigmoid(x_t w_beta + b)`` (the write strength) and
``alpha_t = sigmoid(x_t w_alpha + b)`` (the decay).

* ``LinearAttention`` (Katharopoulos et al. 2020, with a write gate):
  ``W_t = W_{t-1} + beta_t v_t k_t^T`` (dot objective, no decay).
  Departures: the learned write gate beta_t (the original writes with 1) and
  the L2-normalised q, k in place of a positive feature map.
* ``Mamba2`` (SSD, Dao & Gu 2024, Eq. 16 in the state-space form):
  ``W_t = alpha_t W_{t-1} + beta_t v_t k_t^T`` with a scalar data-dependent
  decay per head.  Departures: alpha_t = sigmoid(.) instead of
  exp(-softplus(dt) exp(A)), beta_t a separate gate instead of dt, k and q
  (B and C) L2-normalised, no D skip term; the Mamba block's gated MLP
  around the mixer is not reproduced (the LM's channel mixer follows).
* ``DeltaNet`` (Schlag et al. 2021; Yang et al. 2024, Eq. 1): the exact
  per-token delta rule ``W_t = W_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t
  k_t^T``, i.e. the engine's DGD in its exact WY form with the
  state-independent target v_t (dot objective, ``generated_values`` off), no
  1/C step scaling.  Output: per-head RMSNorm and a SiLU gate (as Gated
  DeltaNet's block).
* ``GatedDeltaNet`` (Yang et al. 2025, Eq. 10):
  ``W_t = alpha_t W_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``
  (``decay_form="gated"``).  Departure: alpha_t = sigmoid(.) instead of the
  Mamba2-style exp(-softplus(.) exp(A)).

* ``TTTLinear`` (Sun et al. 2024, TTT layer with f(x) = x + LN(W x)):
  mini-batch gradient descent on ``l(W; k_t, v_t) = 1/2 ||f(k_t) - v_t||^2``
  over chunks of ``memory_chunk_size`` tokens (the TTT mini-batch b): every
  gradient of a chunk is taken at its start state W_0,
  ``W_t = W_{t-1} - eta_t grad l(W_0; k_t, v_t)``, ``o_t = q_t + LN(W_t q_t)``
  (read after the write), with the learned inner step ``eta_t =
  sigmoid(x_t w_eta + b)``.  Departures: q, k L2-normalised, the LayerNorm
  without learned scale and bias, the 1/2 in the loss (a factor 2 in eta),
  no bias in f.  Here the chunk size changes outputs: it is the mini-batch.

The chunk size (``memory_chunk_size``) changes no output of the other presets:
with a state-independent target and no step scaling the chunked WY form is
the per-token recurrence exactly.  Any ``model.self_modifying`` key given in
the config overrides the preset (e.g. ``path="oracle"``).
"""

from __future__ import annotations

from typing import ClassVar

from nl_jax.models.self_modifying import SelfModifyingTitans

_LINEAR = dict(memory="linear", objective="dot", momentum=False, grad_clip=0.0, lr=1.0,
               adaptive_k=False, adaptive_v=False, adaptive_q=False, adaptive_eta=False,
               adaptive_alpha=False, read="after", step_scale="token",
               normalize_v=False, generated_values=False, memory_chunk_size=64,
               chunk_size=64)


class LinearAttention(SelfModifyingTitans):
    """Gated linear attention: ``W_t = W_{t-1} + beta_t v_t k_t^T``, ``o_t = W_t q_t``."""

    PRESET: ClassVar[dict] = dict(_LINEAR, dgd=False, weight_decay=False)


class Mamba2(SelfModifyingTitans):
    """SSD-style: ``W_t = alpha_t W_{t-1} + beta_t v_t k_t^T``, ``o_t = W_t q_t``."""

    PRESET: ClassVar[dict] = dict(_LINEAR, dgd=False, weight_decay=True)


class DeltaNet(SelfModifyingTitans):
    """The delta rule: ``W_t = W_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T``."""

    PRESET: ClassVar[dict] = dict(_LINEAR, dgd=True, weight_decay=False, output_gate=True)


class GatedDeltaNet(SelfModifyingTitans):
    """Gated delta rule: ``W_t = alpha_t W_{t-1}(I - beta_t k k^T) + beta_t v_t k_t^T``."""

    PRESET: ClassVar[dict] = dict(_LINEAR, dgd=True, weight_decay=True,
                                  decay_form="gated", output_gate=True)


class TTTLinear(SelfModifyingTitans):
    """Mini-batch GD on ``1/2 ||k + LN(W k) - v||^2`` (gradient at the chunk start)."""

    PRESET: ClassVar[dict] = dict(_LINEAR, memory="linear_ln", objective="l2", dgd=False,
                                  weight_decay=False, memory_chunk_size=16, chunk_size=16)

