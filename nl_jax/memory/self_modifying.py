"""Hope's self-modifying memories as a token-clock level (NL section 8, Eq. 83-93).

The engine behind ``models/self_modifying.py`` (which projects the inputs and
holds the parameters): the adaptive memories k, v, q, eta, alpha and the main
memory of one self-modifying Titans layer, their update rule, the per-token
oracle and the chunked path, on explicit weights.  Per head (head dim D):

    k_t = l2norm(M_k(u_t)), v_t = l2norm(M_v(u_t)), q_t = l2norm(plain q_t)
    eta_t = lr * sigmoid(r_eta . M_eta(u_t) + b_eta), alpha_t likewise
    vhat_box,t = M_box(v_t)                  self-generated values
    y_t = M_memory,t-1(q_t)                  read BEFORE the token's own update

(any of k, v, q, eta, alpha may instead come from a plain projection: the
spec's ``adaptive`` / ``plain_*``).

Every memory is ``M(x) = x + W1 sigma(W2 x)`` (``memory="mlp"``, Eq. 89/91,
sigma = SiLU) or ``M(x) = W x`` (``memory="linear"``).  Initial states are
outer-level parameters (``models/self_modifying.py``).  Objective
``L(M; k, vhat) = 1/2 ||M(k) - vhat||^2`` (``objective="l2"``, Eq. 93's scale)
or ``-<M(k), vhat>`` (``"dot"``, Hebbian sign: the update adds
``+eta vhat k^T``; Eq. 92 as restated in docs/equations.md section 3 has the opposite sign).
The target vhat is a constant of the inner gradient.

Update (Eq. 88), applied to every linear layer W of every memory, with the
layer's input ``a_t`` and gradient ``grad_t = d_t a_t^T`` taken at the
CHUNK-START state, ``ahat = a / sqrt(|a|^2 + eps)``:

    S_t = beta_t S_{t-1} - eta_t grad_t                 (momentum=True)
    S_t = -eta_t grad_t                                 (momentum=False)
    W_t = W_{t-1} (alpha_t I - eta_t ahat_t ahat_t^T) + S_t   (dgd=True)
    W_t = alpha_t W_{t-1} + S_t                               (dgd=False, plain GD)
    alpha_t = 1                                               (weight_decay=False)

For the linear memory ``a_t = k_t`` (unit) and this is Eq. 88/93 with
momentum added.  For the MLP memory the preconditioner of each layer uses that
layer's own (normalised) input, so W2 gets exactly ``alpha I - eta k k^T``;
Eq. 88 is ambiguous for the second layer, whose input is not k.

Chunked semantics (NL section 8.2), two chunk sizes: the memories k, v, q,
eta, alpha work in chunks of ``chunk_size`` tokens, the main memory in chunks
of ``memory_chunk_size`` tokens.  Inside a chunk every read of k, v, q, eta,
alpha, every self-generated value vhat and every gradient uses the state at the
end of the previous chunk (the "anchor"); the memory STATES still follow the
per-token recurrence above (with those chunk-start gradients), and the main
memory is read per token, y_t = M_memory,t-1(q_t).

Step normalisation (a choice of this project): inside the update of a memory
whose chunk is C tokens, eta_t is replaced by ``eta_t / C`` (in the momentum
step AND the DGD preconditioner), so a chunk applies at most ``lr`` times the
chunk-start gradient in total: a mini-batch step with the MEAN, not the sum, of
the chunk's gradients.  With the plain sum a chunk applies up to ``C * lr``
times a gradient that gets no feedback inside the chunk; with self-generated
targets ``vhat = M_anchor(v)`` (which scale with the memory) the chunk-to-chunk
map is then expanding and the states grow geometrically along the sequence
(observed on Hope tiny: main memory 0.03 -> 1e5 within 128 tokens at C = 16,
then NaN, while C = 1 or 4 on the same weights stays at 0.5).  The gates read
from the memories (k, v, q, eta, alpha) are unchanged.  Second bound
(``grad_clip`` = G, default 0.25, 0 disables): each token's layer gradient
``delta_t a_t^T`` is scaled to Frobenius norm at most G (``|delta| |a|``), so
``|S_t|_F <= t lr G / C`` and, the DGD factor being a contraction
(eigenvalues in [alpha - eta/C, alpha], within [-1, 1] because ``lr <= C`` is
required), ``|W_T|_F <= |W_0|_F + T^2 lr G / C`` whatever the inputs: the
states cannot grow geometrically (without it the
step still fed back through the unbounded second-layer input ``h`` and the
self-generated targets: main memory 1e8 at step 34 of Hope tiny, then NaN).
With C = 1 and no clipping this is the exact per-token recurrence.  Both paths
implement exactly this:

* ``path="oracle"``: a per-token ``lax.scan`` written from the equations
  (``jax.grad`` for the inner gradients, explicit matrix products).
* ``path="chunked"``: a scan over chunks; inside a chunk every quantity is a
  matmul.  The recurrence of one layer has a WY form: each token adds
  ``w_t ahat_t^T`` with ``w_t = -eta_t W_{t-1} ahat_t``, so
  ``W_t = gamma_t W_0 + f_t S_0 + sum_s D[t,s] w_s ahat_s^T
  - sum_r (D Lb)[t,r] eta_r u_r ahat_r^T`` (``D``, ``Lb`` the decay/momentum
  gate matrices, built in log space) and the ``w`` solve one unit
  lower-triangular system; reads ``W_{t-1} q_t`` are attention-like products.
  An MLP memory is read layer by layer (W2 then W1, each with its own WY form).
  Each chunk is ``jax.checkpoint``-ed; all state math is fp32.

Streaming: ``SelfModifyingState`` (token position, current / momentum /
anchor states of every memory) is returned; segment lengths need not be
multiples of the chunk sizes (``layout.to_stream_chunks``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.gates import segsum
from nl_jax.memory.layout import from_stream_chunks, to_stream_chunks
from nl_jax.memory.maps import clip_scale, l2_normalize
from nl_jax.memory.objectives import HOPE_L2_SCALE
from nl_jax.memory.objectives import objective_error as _objective_error
from nl_jax.memory.objectives import objective_loss as _objective_loss
from nl_jax.memory.triangular import unit_lower_solve, unit_lower_solve_by_masks

EPS = 1e-6
VECTOR_BOXES = ("k", "v", "q")
GATE_BOXES = ("eta", "alpha")
KINDS = ("mlp", "linear", "linear_ln")
OBJECTIVES = ("l2", "dot")
PATHS = ("chunked", "oracle", "kernel", "auto")


# --------------------------------------------------------------------------
# Memories on explicit weights (one head, one sequence).
# --------------------------------------------------------------------------

def layer_norm(z: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without learned parameters (the map of
    TTT-Linear, Sun et al. 2024: f(x) = x + LN(W x))."""
    mean = jnp.mean(z, -1, keepdims=True)
    centred = z - mean
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, -1, keepdims=True) + eps)


def memory_apply(kind: str, w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """M(x) for ``x [..., D]``: ``W x``, ``x + LN(W x)`` (``linear_ln``, TTT-Linear)
    or ``x + W1 silu(W2 x)`` (Eq. 89/91)."""
    if kind == "linear":
        return x @ w["w"].T
    if kind == "linear_ln":
        return x + layer_norm(x @ w["w"].T)
    return x + jax.nn.silu(x @ w["w2"].T) @ w["w1"].T


def objective_error(out: jax.Array, vhat: jax.Array, objective: str) -> jax.Array:
    """dL/dM(k) of Hope's objective: ``M(k) - vhat`` (L2 at Eq. 93's 1/2 scale) or
    ``-vhat`` (dot)."""
    return _objective_error(objective, out, vhat, HOPE_L2_SCALE)


def objective_loss(out: jax.Array, vhat: jax.Array, objective: str) -> jax.Array:
    """Hope's inner objective: ``1/2 ||M(k) - vhat||^2`` (Eq. 93) or ``-<M(k), vhat>``."""
    return _objective_loss(objective, out, vhat, HOPE_L2_SCALE)


def layer_factors(kind: str, w, k: jax.Array, vhat: jax.Array, objective: str):
    """Per-token gradient factors: ``grad_layer,t = delta_t a_t^T`` at ``w``.

    Returns ``{layer: (a [C, din], delta [C, dout])}`` (closed form of the
    inner gradient; the oracle uses ``jax.grad`` instead).
    """
    if kind == "linear":
        return {"w": (k, objective_error(k @ w["w"].T, vhat, objective))}
    if kind == "linear_ln":
        out, ln_vjp = jax.vjp(lambda z: k + layer_norm(z), k @ w["w"].T)
        (delta,) = ln_vjp(objective_error(out, vhat, objective))
        return {"w": (k, delta)}
    z = k @ w["w2"].T
    h, silu_vjp = jax.vjp(jax.nn.silu, z)
    err = objective_error(k + h @ w["w1"].T, vhat, objective)
    (delta2,) = silu_vjp(err @ w["w1"])
    return {"w1": (h, err), "w2": (k, delta2)}


def _normalized(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ahat, |a|) with ``ahat = a / sqrt(|a|^2 + eps)`` and ``ahat |a| = a``."""
    norm = jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + EPS)
    return a / norm, norm


def _prefix_sum(x: jax.Array, inclusive: bool, kernel_body: bool) -> jax.Array:
    """``out[i] = sum_{l <= i} x_l`` (``inclusive``) or ``sum_{l < i} x_l`` (a shifted
    cumulative sum, no subtraction).  ``kernel_body``: as one product with a 0/1
    triangular matrix (Pallas kernel bodies lower no cumsum or concatenation)."""
    if not kernel_body:
        total = jnp.cumsum(x)
        return total if inclusive else jnp.concatenate([jnp.zeros_like(x[:1]), total[:-1]])
    c = x.shape[-1]
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    lower = jnp.where(i >= j if inclusive else i > j, 1.0, 0.0).astype(x.dtype)
    return jnp.matmul(lower, x, precision=jax.lax.Precision.HIGHEST)


def _previous_rows(m: jax.Array, kernel_body: bool) -> jax.Array:
    """``out[t] = m[t-1]``, ``out[0] = 0``; ``kernel_body``: a product with the shift
    matrix (exact), since kernel bodies lower no unaligned concatenation."""
    if not kernel_body:
        return jnp.concatenate([jnp.zeros_like(m[:1]), m[:-1]])
    c = m.shape[0]
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    shift = jnp.where(i == j + 1, 1.0, 0.0).astype(m.dtype)
    return jnp.matmul(shift, m, precision=jax.lax.Precision.HIGHEST)


def _times_vector(m: jax.Array, v: jax.Array, kernel_body: bool) -> jax.Array:
    """``m @ v`` for a vector ``v``; ``kernel_body``: as a sum of elementwise products
    (a matrix-matrix product is the only dot a Pallas TPU kernel body lowers)."""
    return jnp.sum(m * v, -1) if kernel_body else m @ v


def chunk_gate_terms(log_alpha, log_beta, valid=None, momentum: bool = True,
                     read_after: bool = False, kernel_body: bool = False) -> dict:
    """The state-independent gate matrices of one chunk (log-space segment sums).

    They depend only on the chunk's decay and momentum gates, so one set serves
    every layer of every memory that updates on the chunk (and, where the gates
    are known before the chunk scan, all chunks are built at once outside it).
    ``D[t, s] = prod_{s < l <= t} alpha_l``, ``Lb[s, r] = prod_{r < l <= s} beta_l``,
    ``nu`` the token mask (padding tokens do not add the momentum to W).  Every
    product is ``exp`` of a segment sum formed directly (``gates.segsum``, the
    engine's one construction; no difference of prefix sums).

    The ``read_*`` terms place the reads: ``W_{t-1} q_t`` (``read_after``
    False: the decay and momentum sums up to token t-1) or ``W_t q_t`` (up to
    token t, the token's own write included).  ``kernel_body``: the same terms
    from the operations a Pallas kernel body lowers (``_prefix_sum``,
    ``_previous_rows``, ``_times_vector``).
    """
    d = jnp.exp(segsum(log_alpha))                   # D[t, s], s <= t
    dp = _previous_rows(d, kernel_body)              # D[t-1, s], s < t
    d_last = d[-1]                                   # D[C-1, s]
    gamma_prev = jnp.exp(_prefix_sum(log_alpha, False, kernel_body))
    terms = dict(dp=dp, d_last=d_last, gamma_prev=gamma_prev,
                 gamma_last=jnp.exp(jnp.sum(log_alpha)))
    read_d = d if read_after else dp
    terms.update(read_d=read_d,
                 read_gamma=(jnp.exp(_prefix_sum(log_alpha, True, kernel_body)) if read_after
                             else gamma_prev))
    if not momentum:
        return dict(terms, cmp=dp, cm_last=d_last, read_cm=read_d)
    lb = jnp.exp(segsum(log_beta))                   # Lb[s, r], r <= s
    m = jnp.exp(_prefix_sum(log_beta, True, kernel_body))
    nu = jnp.ones_like(log_alpha) if valid is None else valid.astype(log_alpha.dtype)
    dp_nu, d_last_nu, read_nu = dp * nu[None, :], d_last * nu, read_d * nu[None, :]
    cm_last = jnp.sum(d_last_nu[:, None] * lb, 0) if kernel_body else d_last_nu @ lb
    return dict(terms, cmp=dp_nu @ lb, cm_last=cm_last,
                f_prev=_times_vector(dp_nu, m, kernel_body),
                f_last=_times_vector(d_last_nu, m, kernel_body),
                lb_last=lb[-1], beta_last=jnp.exp(jnp.sum(log_beta)),
                read_cm=read_nu @ lb, read_f=_times_vector(read_nu, m, kernel_body))


def dgd_layer_chunk(w0, s0, a, delta, eta, terms: dict, queries, dgd: bool, eta_dgd=None,
                    solve=unit_lower_solve):
    """One chunk of one layer's update, closed form (WY representation).

    Recurrence (per token t of the chunk, ``ahat, u`` from ``a, delta``):
        S_t = beta_t S_{t-1} - eta_t u_t ahat_t^T      (``s0`` None: S_t = -eta_t u_t ahat_t^T)
        W_t = alpha_t W_{t-1} - [dgd] e_t (W_{t-1} ahat_t) ahat_t^T + valid_t S_t
    with the preconditioner's step ``e_t = eta_dgd`` (default ``eta``; the
    gated form alpha_t W_{t-1} (I - eta_t a a^T) passes ``alpha_t eta_t``).
    ``terms``: ``chunk_gate_terms`` of the chunk (with momentum iff ``s0`` is
    given; its ``read_*`` terms say whether a query reads ``W_{t-1}`` or
    ``W_t``).  Padding tokens (``valid`` 0, with eta 0, alpha = beta = 1) leave
    W and S unchanged.  ``solve``: the unit lower-triangular solve
    (``unit_lower_solve_by_masks`` in Pallas kernel bodies).  Returns ``(W_{t-1} q_t
    or W_t q_t for each query row,
    W_C, S_C)``.
    """
    ahat, norm = _normalized(a)
    u = delta * norm                       # u_t ahat_t^T = delta_t a_t^T
    eu = eta[:, None] * u
    eta_dgd = eta if eta_dgd is None else eta_dgd
    dp, gamma_prev, cmp_ = terms["dp"], terms["gamma_prev"], terms["cmp"]
    kk = ahat @ ahat.T
    if dgd:
        rhs = gamma_prev[:, None] * (ahat @ w0.T) - (cmp_ * kk) @ eu
        if s0 is not None:
            rhs = rhs + terms["f_prev"][:, None] * (ahat @ s0.T)
        rhs = -eta_dgd[:, None] * rhs
        wv = solve(eta_dgd[:, None] * dp * kk, rhs)
    out = None
    if queries is not None:
        qk = queries @ ahat.T
        out = terms["read_gamma"][:, None] * (queries @ w0.T) - (terms["read_cm"] * qk) @ eu
        if s0 is not None:
            out = out + terms["read_f"][:, None] * (queries @ s0.T)
        if dgd:
            out = out + (terms["read_d"] * qk) @ wv
    w_new = terms["gamma_last"] * w0 - (terms["cm_last"][:, None] * eu).T @ ahat
    if dgd:
        w_new = w_new + (terms["d_last"][:, None] * wv).T @ ahat
    s_new = None
    if s0 is not None:
        w_new = w_new + terms["f_last"] * s0
        s_new = terms["beta_last"] * s0 - (terms["lb_last"][:, None] * eu).T @ ahat
    return out, w_new, s_new


def memory_chunk(kind, cur, mom, anchor, k, vhat, queries, eta, terms: dict,
                 objective: str, dgd: bool, grad_clip: float = 0.0, eta_dgd=None,
                 solve=unit_lower_solve):
    """One chunk of one memory: per-token reads ``M_{t-1}(q_t)`` (or ``M_t(q_t)``,
    as ``terms`` say) and the new state.

    ``terms``: the chunk's ``chunk_gate_terms``.  Each token's layer gradient
    ``delta a^T`` is clipped to Frobenius norm ``grad_clip``
    (``|delta a^T|_F = |delta| |a|``).  ``eta_dgd``: the DGD preconditioner's
    step and ``solve`` the triangular solve (``dgd_layer_chunk``).
    """
    factors = layer_factors(kind, anchor, k, vhat, objective)
    factors = {name: (a, delta * clip_scale(
        jnp.sum(delta * delta, -1, keepdims=True) * jnp.sum(a * a, -1, keepdims=True),
        grad_clip)) for name, (a, delta) in factors.items()}
    new_cur, new_mom = {}, ({} if mom is not None else None)

    def run(name, q):
        a, delta = factors[name]
        out, new_cur[name], s = dgd_layer_chunk(
            cur[name], None if mom is None else mom[name], a, delta, eta, terms, q, dgd,
            eta_dgd, solve)
        if mom is not None:
            new_mom[name] = s
        return out

    if kind == "linear":
        out = run("w", queries)
    elif kind == "linear_ln":
        out = run("w", queries)
        if queries is not None:
            out = queries + layer_norm(out)
    else:
        hidden = run("w2", queries)
        out = run("w1", None if queries is None else jax.nn.silu(hidden))
        if queries is not None:
            out = queries + out
    return out, new_cur, new_mom


def oracle_memory_step(kind, cur, mom, anchor, k, vhat, eta, alpha, beta,
                       objective: str, dgd: bool, grad_clip: float = 0.0,
                       gated: bool = False):
    """One token of Eq. 88 written plainly: grad at ``anchor`` (each layer's
    clipped to Frobenius norm ``grad_clip``), explicit products.  ``gated``:
    the preconditioner is ``alpha (I - eta a a^T)`` (Gated DeltaNet) instead of
    ``alpha I - eta a a^T`` (Eq. 88)."""
    grads = jax.grad(lambda w: objective_loss(memory_apply(kind, w, k), vhat,
                                              objective))(anchor)
    grads = {name: g * clip_scale(jnp.sum(g * g), grad_clip) for name, g in grads.items()}
    inputs = {"w": k} if kind in ("linear", "linear_ln") else {
        "w2": k, "w1": jax.nn.silu(anchor["w2"] @ k)}
    new_cur, new_mom = {}, ({} if mom is not None else None)
    for name, w in cur.items():
        ahat = inputs[name] / jnp.sqrt(jnp.sum(inputs[name] ** 2) + EPS)
        if mom is not None:
            step = beta * mom[name] - eta * grads[name]
            new_mom[name] = step
        else:
            step = -eta * grads[name]
        if dgd:
            eye, outer = jnp.eye(w.shape[1]), jnp.outer(ahat, ahat)
            precond = alpha * (eye - eta * outer) if gated else alpha * eye - eta * outer
            new_cur[name] = w @ precond + step
        else:
            new_cur[name] = alpha * w + step
    return new_cur, new_mom


# --------------------------------------------------------------------------
# The level's description and state.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SelfModifyingSpec:
    """One self-modifying Titans layer's memories (NL Eq. 83-93).

    Attributes:
      kind: ``"mlp"`` (M(x) = x + W1 silu(W2 x), Eq. 89/91), ``"linear"`` or
        ``"linear_ln"`` (M(x) = x + LN(W x), TTT-Linear).
      objective: ``"l2"`` (1/2 ||M(k) - vhat||^2, Eq. 93) or ``"dot"``.
      dgd: the DGD preconditioner (Eq. 88) in its exact per-token WY form.
      momentum: S_t = beta_t S_{t-1} - eta_t grad_t (retention-style momentum
        gate beta); off: S_t = -eta_t grad_t.
      decay: retention alpha_t (W_t = alpha_t W_{t-1} + ...); off: alpha = 1.
      lr: eta_t = lr * sigmoid(...); each memory's step is eta_t / C (its chunk).
      grad_clip: each token's layer gradient clipped to this Frobenius norm.
      adaptive: the boxes read from their own memory (order of reading and of
        the stacked adaptive states), a subset of k, v, q, eta, alpha.
      plain_vectors, plain_gates: the boxes given by plain projections.
      chunk: C of the adaptive memories; memory_chunk: C of the main memory.
      path: ``"chunked"`` (WY form, chunk scan), ``"oracle"`` (per-token scan),
        ``"kernel"`` (the chunk bodies in the chunk-scan kernels,
        ``kernel_sequences``) or ``"auto"`` (``kernel`` on a TPU, ``chunked``
        elsewhere: ``memory/kernel_path.py``).
      read: ``"before"``: y_t = M_{t-1}(q_t), the read precedes the token's own
        write (Hope, NL Eq. 87); ``"after"``: y_t = M_t(q_t) (Titans Eq. 15,
        DeltaNet, linear attention).
      step_scale: ``"chunk"``: each memory's step is eta_t / C (a mean over
        the chunk's gradients, the bound Hope's self-generated targets need);
        ``"token"``: eta_t (the per-token rules of DeltaNet and linear
        attention).
      decay_form: with ``dgd``, ``"retention"``: W_{t-1} (alpha_t I - eta_t a
        a^T) (NL Eq. 88); ``"gated"``: alpha_t W_{t-1} (I - eta_t a a^T) (Gated
        DeltaNet, Yang et al. 2025, Eq. 10).
      normalize_v: v_t is L2-normalised like k_t and q_t (Hope); off: the raw
        value (DeltaNet, linear attention).
      generated_values: the target is vhat_t = M_anchor(v_t), the memory's own
        output (NL Eq. 84-86, self-generated values); off: v_t itself (a
        state-independent target: the delta rule).

    Built from ``model.self_modifying`` by ``models.self_modifying.spec_from_options``,
    where the defaults live.
    """

    kind: str
    objective: str
    dgd: bool
    momentum: bool
    decay: bool
    lr: float
    grad_clip: float
    adaptive: tuple[str, ...]
    chunk: int
    memory_chunk: int
    path: str
    read: str
    step_scale: str
    decay_form: str
    normalize_v: bool
    generated_values: bool

    def step(self, eta: jax.Array, chunk: int) -> jax.Array:
        """The per-token step of a memory updated in chunks of ``chunk`` tokens."""
        return eta / chunk if self.step_scale == "chunk" else eta

    def preconditioner_step(self, eta: jax.Array, log_alpha: jax.Array) -> jax.Array | None:
        """The DGD preconditioner's step: ``eta`` (None) or ``alpha eta`` (gated)."""
        return eta * jnp.exp(log_alpha) if self.decay_form == "gated" else None

    def target(self, anchor, v: jax.Array) -> jax.Array:
        """vhat: the memory's own output on v (self-generated) or v itself."""
        return memory_apply(self.kind, anchor, v) if self.generated_values else v

    @property
    def plain_vectors(self) -> tuple[str, ...]:
        return tuple(b for b in VECTOR_BOXES if b not in self.adaptive)

    @property
    def plain_gates(self) -> tuple[str, ...]:
        return tuple(b for b in GATE_BOXES if b not in self.adaptive
                     and (b == "eta" or self.decay))


class MemoryTrack(NamedTuple):
    """One memory (or the stack of adaptive memories) of a self-modifying layer.

    Attributes:
      current: the weights W_t, a dict of fp32 leaves ``[B, H, (boxes,) ...]``.
      momentum: S_t, same structure, or None without momentum.
      anchor: the chunk-start weights every read and gradient of the current
        chunk uses (NL section 8.2).
    """

    current: Any
    momentum: Any
    anchor: Any


class SelfModifyingState(NamedTuple):
    """Streaming state of a self-modifying layer's memories (a pytree).

    Attributes:
      pos: tokens seen so far (int32 scalar): places a segment in its chunks.
      adaptive: the adaptive memories stacked on an axis after heads.
      main: the main memory M_memory.
    """

    pos: jax.Array
    adaptive: MemoryTrack
    main: MemoryTrack


def initial_state(spec: SelfModifyingSpec, weights: dict, batch: int) -> SelfModifyingState:
    """The state at a sequence start from the outer-level initial weights.

    ``weights[box]`` holds ``{layer: [H, out, in]}`` for every adaptive box and
    for ``"memory"``; every batch row starts from them with zero momentum.
    """
    def expand(tree):
        return jax.tree.map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), tree)

    # One vmapped update over the stacked adaptive memories instead of one
    # traced copy per memory.
    adaptive = expand(jax.tree.map(lambda *w: jnp.stack(w, axis=1),
                                   *[weights[b] for b in spec.adaptive])
                      if spec.adaptive else {})
    main = expand(weights["memory"])

    def zeros(tree):
        return jax.tree.map(jnp.zeros_like, tree) if spec.momentum else None

    return SelfModifyingState(pos=jnp.zeros((), jnp.int32),
                              adaptive=MemoryTrack(adaptive, zeros(adaptive), adaptive),
                              main=MemoryTrack(main, zeros(main), main))


def map_boxes(fn, *trees):
    """``fn`` over the adaptive memories: vmapped over their stacked axis, or called
    once per memory when they come as a tuple (Pallas kernel bodies, which lower
    no matmul with a batch axis).  A None tree (no momentum) passes None."""
    if not isinstance(trees[0], tuple):
        return jax.vmap(fn)(*trees)
    n = len(trees[0])
    outs = [fn(*(None if t is None else t[i] for t in trees)) for i in range(n)]
    if not isinstance(outs[0], tuple):
        return tuple(outs)
    return tuple(None if all(o[j] is None for o in outs) else tuple(o[j] for o in outs)
                 for j in range(len(outs[0])))


def token_features(spec: SelfModifyingSpec, anchor, u, plain, readout,
                   kernel_body: bool = False):
    """k, v, q, eta, log alpha for a block of tokens from the anchor states.

    ``u [C, D]``; ``plain`` holds the non-adaptive vectors ``[C, D]`` and gate
    logits ``[C]``; ``readout[box] = (r [D], b [])`` for adaptive gates.
    """
    # The adaptive memories are stacked on a leading axis (order spec.adaptive),
    # or a tuple of them in kernel bodies (``map_boxes``).
    outs = (map_boxes(lambda w: memory_apply(spec.kind, w, u), anchor)
            if spec.adaptive else None)
    read = {box: outs[i] for i, box in enumerate(spec.adaptive)}
    feats = {}
    for box in VECTOR_BOXES:
        feats[box] = read[box] if box in spec.adaptive else plain[box]
    for box in VECTOR_BOXES:
        if box != "v" or spec.normalize_v:
            feats[box] = l2_normalize(feats[box])
    logits = {}
    for box in GATE_BOXES:
        if box in spec.adaptive:
            r, b = readout[box]
            logits[box] = _times_vector(read[box], r, kernel_body) + b
        elif box in plain:
            logits[box] = plain[box]
    eta = spec.lr * jax.nn.sigmoid(logits["eta"])
    log_alpha = (jax.nn.log_sigmoid(logits["alpha"]) if spec.decay
                 else jnp.zeros_like(eta))
    return feats["k"], feats["v"], feats["q"], eta, log_alpha


def _where_tree(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def oracle_sequence(spec: SelfModifyingSpec, state, u, plain, log_beta, readout):
    """Per-token scan over one head of one sequence (the oracle).

    ``state``: this head's ``SelfModifyingState``.  Returns ``(y [T, D], new state)``.
    """
    c_o, c_m = spec.chunk, spec.memory_chunk

    def step(carry, inputs):
        pos, (cur_o, mom_o, anc_o), (cur_m, mom_m, anc_m) = carry
        u_t, plain_t, lb_t = inputs
        k, v, q, eta, log_alpha = token_features(spec, anc_o, u_t, plain_t, readout)
        alpha = jnp.exp(log_alpha)
        beta = None if lb_t is None else jnp.exp(lb_t)
        gated = spec.decay_form == "gated"
        y = memory_apply(spec.kind, cur_m, q)          # read before the write
        new_cur_o, new_mom_o = cur_o, mom_o
        if spec.adaptive:
            def update_box(cur, mom, anc):
                return oracle_memory_step(spec.kind, cur, mom, anc, k, spec.target(anc, v),
                                          spec.step(eta, c_o), alpha, beta,
                                          spec.objective, spec.dgd, spec.grad_clip, gated)
            new_cur_o, new_mom_o = jax.vmap(update_box)(cur_o, mom_o, anc_o)
        cur_m, mom_m = oracle_memory_step(spec.kind, cur_m, mom_m, anc_m, k,
                                          spec.target(anc_m, v), spec.step(eta, c_m),
                                          alpha, beta, spec.objective, spec.dgd,
                                          spec.grad_clip, gated)
        if spec.read == "after":
            y = memory_apply(spec.kind, cur_m, q)
        # The anchor (chunk-start state) moves when a chunk's last token is done.
        anc_o = _where_tree((pos + 1) % c_o == 0, new_cur_o, anc_o)
        anc_m = _where_tree((pos + 1) % c_m == 0, cur_m, anc_m)
        return (pos + 1, (new_cur_o, new_mom_o, anc_o), (cur_m, mom_m, anc_m)), y

    carry = (state.pos, tuple(state.adaptive), tuple(state.main))
    carry, ys = jax.lax.scan(step, carry, (u, plain, log_beta))
    pos, other, mem = carry
    return ys, SelfModifyingState(pos, MemoryTrack(*other), MemoryTrack(*mem))


def adaptive_chunk(spec: SelfModifyingSpec, readout, carry, inputs, kernel_body: bool = False):
    """One chunk of the adaptive memories (stage 1 of ``chunked_sequence``, one head).

    ``carry``: (current, momentum, anchor) of the stacked adaptive memories;
    ``inputs``: (u ``[C, D]``, the plain vectors and gate logits, log beta
    ``[C]``, valid ``[C]``, complete).  Reads k, v, q, eta, alpha from the
    anchors, updates every adaptive memory with one set of gate matrices, and
    moves the anchors when the chunk is complete.  Returns (carry, (k, v, q,
    eta, log alpha)).  ``kernel_body``: built from what a Pallas kernel body lowers
    (``chunk_gate_terms``, ``unit_lower_solve_by_masks``)."""
    cur, mom, anc = carry
    u_k, plain_k, lb_k, valid_k, complete_k = inputs
    k, v, q, eta, log_alpha = token_features(spec, anc, u_k, plain_k, readout, kernel_body)
    eta = jnp.where(valid_k, eta, 0.0)
    log_alpha = jnp.where(valid_k, log_alpha, 0.0)
    lb_k = jnp.where(valid_k, lb_k, 0.0)
    # One set of gate matrices for every layer of every adaptive memory.
    terms = chunk_gate_terms(log_alpha, lb_k, valid_k, spec.momentum,
                             kernel_body=kernel_body)
    solve = unit_lower_solve_by_masks if kernel_body else unit_lower_solve
    step = spec.step(eta, spec.chunk)
    step_dgd = spec.preconditioner_step(step, log_alpha)

    def update_box(cur_b, mom_b, anc_b):
        _, new_cur_b, new_mom_b = memory_chunk(
            spec.kind, cur_b, mom_b, anc_b, k, spec.target(anc_b, v), None, step, terms,
            spec.objective, spec.dgd, spec.grad_clip, step_dgd, solve)
        return new_cur_b, new_mom_b

    new_cur, new_mom = map_boxes(update_box, cur, mom, anc)
    anc = _where_tree(complete_k, new_cur, anc)
    return (new_cur, new_mom, anc), (k, v, q, eta, log_alpha)


def main_chunk(spec: SelfModifyingSpec, carry, inputs, solve=unit_lower_solve):
    """One chunk of the main memory (stage 2 of ``chunked_sequence``, one head):
    ``carry`` (current, momentum, anchor), ``inputs`` (k, v, q ``[C, D]``, the
    per-token step and DGD step ``[C]``, the chunk's ``chunk_gate_terms``,
    complete).  Returns (carry, the reads ``[C, D]``)."""
    cur, mom, anc = carry
    k_k, v_k, q_k, eta_k, eta_dgd_k, terms_k, complete_k = inputs
    y, cur, mom = memory_chunk(spec.kind, cur, mom, anc, k_k, spec.target(anc, v_k), q_k,
                               eta_k, terms_k, spec.objective, spec.dgd, spec.grad_clip,
                               eta_dgd_k, solve)
    anc = _where_tree(complete_k, cur, anc)
    return (cur, mom, anc), y


def chunked_sequence(spec: SelfModifyingSpec, state, u, plain, log_beta, readout, streaming: bool):
    """Chunked path over one head of one sequence (same math as the oracle).

    Stage 1 (chunks of ``chunk_size``): reads k, v, q, eta, alpha from the
    anchor states of the adaptive memories and updates them.  Stage 2 (chunks
    of ``memory_chunk_size``): per-token reads of the main memory and its update.
    """
    t = u.shape[0]
    pos = state.pos
    lb_all = log_beta if log_beta is not None else jnp.zeros((t,))

    def chunk_inputs(tree, chunk, offset):
        # to_stream_chunks works on [B, T, ...]; add a unit batch axis.
        out = jax.tree.map(lambda x: to_stream_chunks(x[None], offset, chunk, streaming)[0][:, 0],
                           tree)
        _, valid, complete = to_stream_chunks(jnp.zeros((1, t)), offset, chunk, streaming)
        return out, valid, complete

    def unchunk(tree, offset):
        return jax.tree.map(lambda y: from_stream_chunks(y[:, None], offset, t)[0], tree)

    # Stage 1: adaptive memories.
    off_o = pos % spec.chunk if streaming else 0
    (u_c, plain_c, lb_c), valid_o, complete_o = chunk_inputs(
        (u, plain, lb_all), spec.chunk, off_o)

    stage1 = functools.partial(adaptive_chunk, spec, readout)

    other = tuple(state.adaptive)
    if spec.adaptive:
        other, feats_c = jax.lax.scan(jax.checkpoint(stage1), other,
                                      (u_c, plain_c, lb_c, valid_o, complete_o))
        k, v, q, eta, log_alpha = unchunk(feats_c, off_o)
    else:
        k, v, q, eta, log_alpha = token_features(spec, {}, u, plain, readout)

    # Stage 2: the main memory.
    off_m = pos % spec.memory_chunk if streaming else 0
    (k_c, v_c, q_c, eta_c, la_c, lb_c), valid_m, complete_m = chunk_inputs(
        (k, v, q, eta, log_alpha, lb_all), spec.memory_chunk, off_m)

    # The gates are known before the scan: mask the padding and build every
    # chunk's gate matrices at once, outside the sequential loop.
    eta_c = spec.step(jnp.where(valid_m, eta_c, 0.0), spec.memory_chunk)
    la_c = jnp.where(valid_m, la_c, 0.0)
    lb_c = jnp.where(valid_m, lb_c, 0.0)
    eta_dgd_c = spec.preconditioner_step(eta_c, la_c)
    read_after = spec.read == "after"
    terms_c = jax.vmap(lambda la, lb, valid: chunk_gate_terms(
        la, lb, valid, spec.momentum, read_after))(la_c, lb_c, valid_m)

    stage2 = functools.partial(main_chunk, spec)

    mem, ys = jax.lax.scan(jax.checkpoint(stage2), tuple(state.main),
                           (k_c, v_c, q_c, eta_c, eta_dgd_c, terms_c, complete_m))
    y = unchunk(ys, off_m)
    return y, SelfModifyingState(pos + t, MemoryTrack(*other), MemoryTrack(*mem))


def _kernel_adaptive_step(spec: SelfModifyingSpec, carry, inputs):
    """``adaptive_chunk`` as a kernel step: the readout travels with the chunk's inputs."""
    *rest, readout = inputs
    return adaptive_chunk(spec, readout, carry, tuple(rest), kernel_body=True)


def _kernel_main_step(spec: SelfModifyingSpec, carry, inputs):
    return main_chunk(spec, carry, inputs, unit_lower_solve_by_masks)


def kernel_sequences(spec: SelfModifyingSpec, state: SelfModifyingState, u, plain, log_beta,
                     readout, streaming: bool):
    """``chunked_sequence`` for every head of every sequence, each stage's recurrence
    over chunks in the chunk-scan kernels (``kernels/chunk_scan.py``: forward and
    backward in Pallas, the memories resident on chip; interpret mode on the CPU).

    The same chunk bodies (``adaptive_chunk``, ``main_chunk``) with the
    triangular solve of kernel bodies (``unit_lower_solve_by_masks``).  Arguments
    and results as ``apply_self_modifying``.
    """
    from nl_jax.memory.kernel_path import on_local_shards, require_backend
    from nl_jax_kernels.chunk_scan import chunk_scan

    require_backend("model.self_modifying.path", None)
    b, t, h = u.shape[:3]
    pos = state.pos
    lb_all = log_beta if log_beta is not None else jnp.zeros((b, t, h), jnp.float32)

    def chunked(tree, chunk, offset):       # [B, T, H, ...] -> [N, B, H, C, ...]
        out = jax.tree.map(lambda x: jnp.moveaxis(
            to_stream_chunks(x, offset, chunk, streaming)[0], 3, 2), tree)
        _, valid, complete = to_stream_chunks(jnp.zeros((1, t)), offset, chunk, streaming)
        n = complete.shape[0]
        return (out, jnp.broadcast_to(valid[:, None, None], (n, b, h, chunk)),
                jnp.broadcast_to(complete[:, None, None], (n, b, h)))

    def unchunked(tree, offset):            # [N, B, H, C, ...] -> [B, T, H, ...]
        return jax.tree.map(lambda y: from_stream_chunks(jnp.moveaxis(y, 2, 3), offset, t),
                            tree)

    def scan(step, carry, xs):               # -> (final carry, ys), as lax.scan
        # (the chunk bodies slice values, which Pallas Triton does not lower: on
        # a CUDA GPU the recurrence runs as the jnp reference scan)
        run = functools.partial(chunk_scan, step, triton=False)
        return on_local_shards(run, carry, xs)[::-1]

    # Stage 1: adaptive memories.
    other = tuple(state.adaptive)
    if spec.adaptive:
        off_o = pos % spec.chunk if streaming else 0
        (u_c, plain_c, lb_c), valid_o, complete_o = chunked((u, plain, lb_all), spec.chunk,
                                                            off_o)
        n_o = valid_o.shape[0]
        readout_c = jax.tree.map(
            lambda r: jnp.broadcast_to(r, (n_o, b) + r.shape).astype(jnp.float32), readout)
        n_boxes = len(spec.adaptive)          # one tree per memory (``map_boxes``)
        per_box = tuple(None if tree is None else tuple(
            jax.tree.map(lambda x, i=i: x[:, :, i], tree) for i in range(n_boxes))
            for tree in other)
        per_box, feats_c = scan(functools.partial(_kernel_adaptive_step, spec), per_box,
                                (u_c, plain_c, lb_c, valid_o, complete_o, readout_c))
        other = tuple(None if tree is None else jax.tree.map(
            lambda *x: jnp.stack(x, axis=2), *tree) for tree in per_box)
        k, v, q, eta, log_alpha = unchunked(feats_c, off_o)
    else:
        k, v, q, eta, log_alpha = token_features(spec, {}, u, plain, readout)

    # Stage 2: the main memory; every chunk's gate matrices built before the scan.
    off_m = pos % spec.memory_chunk if streaming else 0
    (k_c, v_c, q_c, eta_c, la_c, lb_c), valid_m, complete_m = chunked(
        (k, v, q, eta, log_alpha, lb_all), spec.memory_chunk, off_m)
    eta_c = spec.step(jnp.where(valid_m, eta_c, 0.0), spec.memory_chunk)
    la_c = jnp.where(valid_m, la_c, 0.0)
    lb_c = jnp.where(valid_m, lb_c, 0.0)
    eta_dgd_c = spec.preconditioner_step(eta_c, la_c)
    read_after = spec.read == "after"
    gate_terms = functools.partial(chunk_gate_terms, momentum=spec.momentum,
                                   read_after=read_after)
    terms_c = jax.vmap(jax.vmap(jax.vmap(gate_terms)))(la_c, lb_c, valid_m)
    mem, ys = scan(functools.partial(_kernel_main_step, spec), tuple(state.main),
                   (k_c, v_c, q_c, eta_c, eta_dgd_c, terms_c, complete_m))
    y = unchunked(ys, off_m)
    return y, SelfModifyingState(pos + t, MemoryTrack(*other), MemoryTrack(*mem))


def apply_self_modifying(spec: SelfModifyingSpec, state: SelfModifyingState, u, plain,
                         log_beta, readout, streaming: bool):
    """Every head of every sequence: ``(y [B, T, H, D], new state)``.

    ``u [B, T, H, D]``: the adaptive memories' shared input; ``plain``: the
    plain vectors ``[B, T, H, D]`` and gate logits ``[B, T, H]``; ``log_beta``
    ``[B, T, H]`` (log momentum gate) or None; ``readout[box] = (r [H, D],
    b [H])`` for the adaptive gates; ``streaming``: ``state`` continues an
    earlier segment (its position need not be a chunk boundary).
    """
    if spec.path == "auto":
        from nl_jax.memory.kernel_path import resolve
        spec = dataclasses.replace(spec, path=resolve(spec.path, gpu_kernel=False))
    if spec.path == "kernel":
        return kernel_sequences(spec, state, u, plain, log_beta, readout, streaming)

    def one_head(st, u_h, plain_h, lb_h, ro_h):
        if spec.path == "oracle":
            return oracle_sequence(spec, st, u_h, plain_h, lb_h, ro_h)
        return chunked_sequence(spec, st, u_h, plain_h, lb_h, ro_h, streaming)

    # vmap over heads (axis 2 of [B, T, H, ...] inputs, 1 of [B, H, ...] states),
    # then over the batch.
    state_axes = SelfModifyingState(pos=None, adaptive=0, main=0)
    beta_axis = None if log_beta is None else 1
    per_head = jax.vmap(one_head, in_axes=(state_axes, 1, 1, beta_axis, 0),
                        out_axes=(1, state_axes))
    per_batch = jax.vmap(per_head, in_axes=(state_axes, 0, 0, None if log_beta is None
                                            else 0, None),
                         out_axes=(0, state_axes))
    return per_batch(state, u, plain, log_beta, readout)
