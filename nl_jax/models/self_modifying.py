"""Self-modifying Titans, the token mixer of Hope (NL section 8, Eq. 76-93).

Per head (head dim D), with plain projections and causal convolutions
(window ``conv_window``, streaming ``layers.CausalConv``):

    u_t = conv(x_t W_u)                    shared input of the adaptive memories
    k_t = l2norm(M_k(u_t))      or  l2norm(conv(x_t W_k))   (adaptive_k=False)
    v_t = l2norm(M_v(u_t))      or  l2norm(conv(x_t W_v))   (adaptive_v=False)
    q_t = l2norm(conv(x_t W_q)) or  l2norm(M_q(u_t))        (adaptive_q=True)
    eta_t   = lr * sigmoid(r_eta . M_eta(u_t) + b_eta)     (or of x_t W_eta)
    alpha_t = sigmoid(r_alpha . M_alpha(u_t) + b_alpha)    (or of x_t W_alpha)
    beta_t  = sigmoid(x_t W_beta + b_beta)                 momentum decay (plain)
    vhat_box,t = M_box(v_t)                                 self-generated values
    y_t = M_memory,t-1(q_t)            read BEFORE the token's own update (NL)
    out = [y_t over heads] W_o

v is L2-normalised too (a choice of this project): with self-generated
targets ``vhat = M(v)`` an unnormalised v makes each memory grow by about
|v| per step, a positive feedback through M_v (observed: states of 1e4 after
12 tokens); with unit q, k, v every map is between unit vectors.

Every memory is ``M(x) = x + W1 sigma(W2 x)`` (``memory="mlp"``, Eq. 89/91,
sigma = SiLU) or ``M(x) = W x`` (``memory="linear"``).  Initial states are
ordinary ``nnx.Param`` (the outer level).  Objective
``L(M; k, vhat) = 1/2 ||M(k) - vhat||^2`` (``objective="l2"``, Eq. 93's scale)
or ``-<M(k), vhat>`` (``"dot"``, Hebbian sign: the update adds
``+eta vhat k^T``; Eq. 92 as transcribed in NL_MATH has the opposite sign).
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

Streaming: the state (conv tails, current/anchor/momentum states of every
memory, token position) is returned; segment lengths need not be multiples of
the chunk sizes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory.maps import clip_scale
from nl_jax.memory.triangular import unit_lower_solve
from nl_jax.models.cms import from_chunks, to_chunks
from nl_jax.models.layers import CausalConv, Dense, l2_normalize, param
from nl_jax.sharding import constrain, gather_memory_state, memory_state_axes

EPS = 1e-6
VECTOR_BOXES = ("k", "v", "q")
GATE_BOXES = ("eta", "alpha")
DEFAULTS = dict(path="chunked", memory="mlp", objective="l2", chunk_size=32,
                memory_chunk_size=16, hidden_mult=2, lr=1.0, conv_window=4,
                dgd=True, momentum=True, weight_decay=True, adaptive_k=True,
                adaptive_v=True, adaptive_q=False, adaptive_eta=True,
                adaptive_alpha=True, grad_clip=0.25)


# --------------------------------------------------------------------------
# Memories on explicit weights (one head, one sequence).
# --------------------------------------------------------------------------

def memory_apply(kind: str, w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """M(x) for ``x [..., D]``: ``W x`` or ``x + W1 silu(W2 x)`` (Eq. 89/91)."""
    if kind == "linear":
        return x @ w["w"].T
    return x + jax.nn.silu(x @ w["w2"].T) @ w["w1"].T


def objective_error(out: jax.Array, vhat: jax.Array, objective: str) -> jax.Array:
    """dL/dM(k): ``M(k) - vhat`` (L2, 1/2 scale) or ``-vhat`` (dot)."""
    return out - vhat if objective == "l2" else -vhat


def objective_loss(out: jax.Array, vhat: jax.Array, objective: str) -> jax.Array:
    if objective == "l2":
        return 0.5 * jnp.sum((out - vhat) ** 2)
    return -jnp.sum(out * vhat)


def layer_factors(kind: str, w, k: jax.Array, vhat: jax.Array, objective: str):
    """Per-token gradient factors: ``grad_layer,t = delta_t a_t^T`` at ``w``.

    Returns ``{layer: (a [C, din], delta [C, dout])}`` (closed form of the
    inner gradient; the oracle uses ``jax.grad`` instead).
    """
    if kind == "linear":
        return {"w": (k, objective_error(k @ w["w"].T, vhat, objective))}
    z = k @ w["w2"].T
    h, silu_vjp = jax.vjp(jax.nn.silu, z)
    err = objective_error(k + h @ w["w1"].T, vhat, objective)
    (delta2,) = silu_vjp(err @ w["w1"])
    return {"w1": (h, err), "w2": (k, delta2)}


def _normalized(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ahat, |a|) with ``ahat = a / sqrt(|a|^2 + eps)`` and ``ahat |a| = a``."""
    norm = jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + EPS)
    return a / norm, norm


def _segsum_exp(log_x: jax.Array, prev: bool) -> jax.Array:
    """Gate matrix ``G[i, s] = prod_{s < l <= i'} x_l`` for ``s <= i'``, else 0.

    ``i' = i`` (``prev=False``, includes the diagonal) or ``i' = i - 1``
    (``prev=True``: strictly lower, the product up to the token before i).
    Built from differences of cumulative log sums under a mask (log space).
    """
    c = log_x.shape[0]
    cum = jnp.cumsum(log_x)
    rows = cum - log_x if prev else cum
    i, s = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    mask = s < i if prev else s <= i
    return jnp.where(mask, jnp.exp(jnp.where(mask, rows[:, None] - cum[None, :], 0.0)), 0.0)


def chunk_gate_terms(log_alpha, log_beta, valid=None, momentum: bool = True) -> dict:
    """The state-independent gate matrices of one chunk (log-space segment sums).

    They depend only on the chunk's decay and momentum gates, so one set serves
    every layer of every memory that updates on the chunk (and, where the gates
    are known before the chunk scan, all chunks are built at once outside it).
    ``D[t, s] = prod_{s < l <= t} alpha_l``, ``Lb[s, r] = prod_{r < l <= s} beta_l``,
    ``nu`` the token mask (padding tokens do not add the momentum to W).
    """
    cum = jnp.cumsum(log_alpha)
    dp = _segsum_exp(log_alpha, prev=True)           # D[t-1, s], s < t
    d_last = jnp.exp(cum[-1] - cum)                  # D[C-1, s]
    terms = dict(dp=dp, d_last=d_last, gamma_prev=jnp.exp(cum - log_alpha),
                 gamma_last=jnp.exp(jnp.sum(log_alpha)))
    if not momentum:
        return dict(terms, cmp=dp, cm_last=d_last)
    lb = _segsum_exp(log_beta, prev=False)           # Lb[s, r], r <= s
    cum_b = jnp.cumsum(log_beta)
    m = jnp.exp(cum_b)
    nu = jnp.ones_like(log_alpha) if valid is None else valid.astype(log_alpha.dtype)
    dp_nu, d_last_nu = dp * nu[None, :], d_last * nu
    return dict(terms, cmp=dp_nu @ lb, cm_last=d_last_nu @ lb, f_prev=dp_nu @ m,
                f_last=d_last_nu @ m, lb_last=jnp.exp(cum_b[-1] - cum_b),
                beta_last=jnp.exp(jnp.sum(log_beta)))


def dgd_layer_chunk(w0, s0, a, delta, eta, terms: dict, queries, dgd: bool):
    """One chunk of one layer's update, closed form (WY representation).

    Recurrence (per token t of the chunk, ``ahat, u`` from ``a, delta``):
        S_t = beta_t S_{t-1} - eta_t u_t ahat_t^T      (``s0`` None: S_t = -eta_t u_t ahat_t^T)
        W_t = alpha_t W_{t-1} - [dgd] eta_t (W_{t-1} ahat_t) ahat_t^T + valid_t S_t
    ``terms``: ``chunk_gate_terms`` of the chunk (with momentum iff ``s0`` is
    given).  Padding tokens (``valid`` 0, with eta 0, alpha = beta = 1) leave W
    and S unchanged.  Returns ``(W_{t-1} q_t for each query row, W_C, S_C)``.
    """
    ahat, norm = _normalized(a)
    u = delta * norm                       # u_t ahat_t^T = delta_t a_t^T
    eu = eta[:, None] * u
    dp, gamma_prev, cmp_ = terms["dp"], terms["gamma_prev"], terms["cmp"]
    kk = ahat @ ahat.T
    if dgd:
        rhs = gamma_prev[:, None] * (ahat @ w0.T) - (cmp_ * kk) @ eu
        if s0 is not None:
            rhs = rhs + terms["f_prev"][:, None] * (ahat @ s0.T)
        rhs = -eta[:, None] * rhs
        wv = unit_lower_solve(eta[:, None] * dp * kk, rhs)
    out = None
    if queries is not None:
        qk = queries @ ahat.T
        out = gamma_prev[:, None] * (queries @ w0.T) - (cmp_ * qk) @ eu
        if s0 is not None:
            out = out + terms["f_prev"][:, None] * (queries @ s0.T)
        if dgd:
            out = out + (dp * qk) @ wv
    w_new = terms["gamma_last"] * w0 - (terms["cm_last"][:, None] * eu).T @ ahat
    if dgd:
        w_new = w_new + (terms["d_last"][:, None] * wv).T @ ahat
    s_new = None
    if s0 is not None:
        w_new = w_new + terms["f_last"] * s0
        s_new = terms["beta_last"] * s0 - (terms["lb_last"][:, None] * eu).T @ ahat
    return out, w_new, s_new


def memory_chunk(kind, cur, mom, anchor, k, vhat, queries, eta, terms: dict,
                 objective: str, dgd: bool, grad_clip: float = 0.0):
    """One chunk of one memory: per-token reads ``M_{t-1}(q_t)`` and the new state.

    ``terms``: the chunk's ``chunk_gate_terms``.  Each token's layer gradient
    ``delta a^T`` is clipped to Frobenius norm ``grad_clip``
    (``|delta a^T|_F = |delta| |a|``).
    """
    factors = layer_factors(kind, anchor, k, vhat, objective)
    factors = {name: (a, delta * clip_scale(
        jnp.sum(delta * delta, -1, keepdims=True) * jnp.sum(a * a, -1, keepdims=True),
        grad_clip)) for name, (a, delta) in factors.items()}
    new_cur, new_mom = {}, ({} if mom is not None else None)

    def run(name, q):
        a, delta = factors[name]
        out, new_cur[name], s = dgd_layer_chunk(
            cur[name], None if mom is None else mom[name], a, delta, eta, terms, q, dgd)
        if mom is not None:
            new_mom[name] = s
        return out

    if kind == "linear":
        out = run("w", queries)
    else:
        hidden = run("w2", queries)
        out = run("w1", None if queries is None else jax.nn.silu(hidden))
        if queries is not None:
            out = queries + out
    return out, new_cur, new_mom


def oracle_memory_step(kind, cur, mom, anchor, k, vhat, eta, alpha, beta,
                       objective: str, dgd: bool, grad_clip: float = 0.0):
    """One token of Eq. 88 written plainly: grad at ``anchor`` (each layer's
    clipped to Frobenius norm ``grad_clip``), explicit products."""
    grads = jax.grad(lambda w: objective_loss(memory_apply(kind, w, k), vhat,
                                              objective))(anchor)
    grads = {name: g * clip_scale(jnp.sum(g * g), grad_clip) for name, g in grads.items()}
    inputs = {"w": k} if kind == "linear" else {
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
            precond = alpha * jnp.eye(w.shape[1]) - eta * jnp.outer(ahat, ahat)
            new_cur[name] = w @ precond + step
        else:
            new_cur[name] = alpha * w + step
    return new_cur, new_mom


# --------------------------------------------------------------------------
# Per-head, per-sequence token computations shared by both paths.
# --------------------------------------------------------------------------

class _Spec:
    """Static description of one layer: which memories exist, which flags."""

    def __init__(self, c: dict):
        self.kind, self.objective = c["memory"], c["objective"]
        self.dgd, self.momentum, self.decay = c["dgd"], c["momentum"], c["weight_decay"]
        self.lr = float(c["lr"])
        self.grad_clip = float(c["grad_clip"])
        adaptive = {b: c[f"adaptive_{b}"] for b in VECTOR_BOXES + GATE_BOXES}
        if not self.decay:
            adaptive["alpha"] = False
        self.adaptive = tuple(b for b in VECTOR_BOXES + GATE_BOXES if adaptive[b])
        self.plain_vectors = tuple(b for b in VECTOR_BOXES if b not in self.adaptive)
        self.plain_gates = tuple(b for b in GATE_BOXES if b not in self.adaptive
                                 and (b == "eta" or self.decay))
        self.chunk, self.memory_chunk = c["chunk_size"], c["memory_chunk_size"]


def token_features(spec: _Spec, anchor, u, plain, readout):
    """k, v, q, eta, log alpha for a block of tokens from the anchor states.

    ``u [C, D]``; ``plain`` holds the non-adaptive vectors ``[C, D]`` and gate
    logits ``[C]``; ``readout[box] = (r [D], b [])`` for adaptive gates.
    """
    # The adaptive memories are stacked on a leading axis (order spec.adaptive).
    outs = (jax.vmap(lambda w: memory_apply(spec.kind, w, u))(anchor)
            if spec.adaptive else None)
    read = {box: outs[i] for i, box in enumerate(spec.adaptive)}
    feats = {}
    for box in VECTOR_BOXES:
        feats[box] = read[box] if box in spec.adaptive else plain[box]
    for box in VECTOR_BOXES:
        feats[box] = l2_normalize(feats[box])
    logits = {}
    for box in GATE_BOXES:
        if box in spec.adaptive:
            r, b = readout[box]
            logits[box] = read[box] @ r + b
        elif box in plain:
            logits[box] = plain[box]
    eta = spec.lr * jax.nn.sigmoid(logits["eta"])
    log_alpha = (jax.nn.log_sigmoid(logits["alpha"]) if spec.decay
                 else jnp.zeros_like(eta))
    return feats["k"], feats["v"], feats["q"], eta, log_alpha


def _where_tree(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def oracle_sequence(spec: _Spec, state, u, plain, log_beta, readout):
    """Per-token scan over one head of one sequence (the oracle).

    ``state`` = dict(pos, other=(cur, mom, anchor), mem=(cur, mom, anchor)).
    Returns ``(y [T, D], new state)``.
    """
    c_o, c_m = spec.chunk, spec.memory_chunk

    def step(carry, inputs):
        pos, (cur_o, mom_o, anc_o), (cur_m, mom_m, anc_m) = carry
        u_t, plain_t, lb_t = inputs
        k, v, q, eta, log_alpha = token_features(spec, anc_o, u_t, plain_t, readout)
        alpha = jnp.exp(log_alpha)
        beta = None if lb_t is None else jnp.exp(lb_t)
        y = memory_apply(spec.kind, cur_m, q)
        new_cur_o, new_mom_o = cur_o, mom_o
        if spec.adaptive:
            def update_box(cur, mom, anc):
                vhat = memory_apply(spec.kind, anc, v)
                return oracle_memory_step(spec.kind, cur, mom, anc, k, vhat, eta / c_o,
                                          alpha,
                                          beta, spec.objective, spec.dgd,
                                          spec.grad_clip)
            new_cur_o, new_mom_o = jax.vmap(update_box)(cur_o, mom_o, anc_o)
        vhat = memory_apply(spec.kind, anc_m, v)
        cur_m, mom_m = oracle_memory_step(spec.kind, cur_m, mom_m, anc_m, k, vhat,
                                          eta / c_m,
                                          alpha, beta, spec.objective, spec.dgd,
                                          spec.grad_clip)
        # The anchor (chunk-start state) moves when a chunk's last token is done.
        anc_o = _where_tree((pos + 1) % c_o == 0, new_cur_o, anc_o)
        anc_m = _where_tree((pos + 1) % c_m == 0, cur_m, anc_m)
        return (pos + 1, (new_cur_o, new_mom_o, anc_o), (cur_m, mom_m, anc_m)), y

    carry = (state["pos"], state["other"], state["mem"])
    carry, ys = jax.lax.scan(step, carry, (u, plain, log_beta))
    pos, other, mem = carry
    return ys, dict(pos=pos, other=other, mem=mem)


def chunked_sequence(spec: _Spec, state, u, plain, log_beta, readout, streaming: bool):
    """Chunked path over one head of one sequence (same math as the oracle).

    Stage 1 (chunks of ``chunk_size``): reads k, v, q, eta, alpha from the
    anchor states of the adaptive memories and updates them.  Stage 2 (chunks
    of ``memory_chunk_size``): per-token reads of the main memory and its update.
    """
    t = u.shape[0]
    pos = state["pos"]
    lb_all = log_beta if log_beta is not None else jnp.zeros((t,))

    def chunk_inputs(tree, chunk, offset):
        # to_chunks works on [B, T, ...]; add a unit batch axis.
        out = jax.tree.map(lambda x: to_chunks(x[None], offset, chunk, streaming)[0][:, 0],
                           tree)
        _, valid, complete = to_chunks(jnp.zeros((1, t)), offset, chunk, streaming)
        return out, valid, complete

    def unchunk(tree, offset):
        return jax.tree.map(lambda y: from_chunks(y[:, None], offset, t)[0], tree)

    # Stage 1: adaptive memories.
    off_o = pos % spec.chunk if streaming else 0
    (u_c, plain_c, lb_c), valid_o, complete_o = chunk_inputs(
        (u, plain, lb_all), spec.chunk, off_o)

    def stage1(carry, inputs):
        cur, mom, anc = carry
        u_k, plain_k, lb_k, valid_k, complete_k = inputs
        k, v, q, eta, log_alpha = token_features(spec, anc, u_k, plain_k, readout)
        eta = jnp.where(valid_k, eta, 0.0)
        log_alpha = jnp.where(valid_k, log_alpha, 0.0)
        lb_k = jnp.where(valid_k, lb_k, 0.0)
        # One set of gate matrices for every layer of every adaptive memory.
        terms = chunk_gate_terms(log_alpha, lb_k, valid_k, spec.momentum)

        def update_box(cur_b, mom_b, anc_b):
            vhat = memory_apply(spec.kind, anc_b, v)
            _, new_cur_b, new_mom_b = memory_chunk(
                spec.kind, cur_b, mom_b, anc_b, k, vhat, None, eta / spec.chunk, terms,
                spec.objective, spec.dgd, spec.grad_clip)
            return new_cur_b, new_mom_b

        new_cur, new_mom = jax.vmap(update_box)(cur, mom, anc)
        anc = _where_tree(complete_k, new_cur, anc)
        return (new_cur, new_mom, anc), (k, v, q, eta, log_alpha)

    other = state["other"]
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
    eta_c = jnp.where(valid_m, eta_c, 0.0) / spec.memory_chunk
    la_c = jnp.where(valid_m, la_c, 0.0)
    lb_c = jnp.where(valid_m, lb_c, 0.0)
    terms_c = jax.vmap(lambda la, lb, valid: chunk_gate_terms(la, lb, valid, spec.momentum))(
        la_c, lb_c, valid_m)

    def stage2(carry, inputs):
        cur, mom, anc = carry
        k_k, v_k, q_k, eta_k, terms_k, complete_k = inputs
        vhat = memory_apply(spec.kind, anc, v_k)
        y, cur, mom = memory_chunk(spec.kind, cur, mom, anc, k_k, vhat, q_k, eta_k, terms_k,
                                   spec.objective, spec.dgd, spec.grad_clip)
        anc = _where_tree(complete_k, cur, anc)
        return (cur, mom, anc), y

    mem, ys = jax.lax.scan(jax.checkpoint(stage2), state["mem"],
                           (k_c, v_c, q_c, eta_c, terms_c, complete_m))
    y = unchunk(ys, off_m)
    return y, dict(pos=pos + t, other=other, mem=mem)


# --------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------

def _config(cfg) -> dict:
    given = dict(cfg.get("self_modifying", None) or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"model.self_modifying has unknown keys {unknown}; allowed: "
                          f"{sorted(DEFAULTS)}")
    c = {**DEFAULTS, **given}
    choices = dict(path=("chunked", "oracle"), memory=("mlp", "linear"),
                   objective=("l2", "dot"))
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"model.self_modifying.{key}={c[key]!r}; choose one of "
                              f"{list(allowed)}")
    for key in ("chunk_size", "memory_chunk_size", "hidden_mult", "conv_window"):
        v = c[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"model.self_modifying.{key} must be a positive integer, "
                              f"got {v!r}")
    if not isinstance(c["lr"], (int, float)) or c["lr"] < 0:
        raise ConfigError(f"model.self_modifying.lr must be a number >= 0, got {c['lr']!r}")
    smallest = min(c["chunk_size"], c["memory_chunk_size"])
    if c["lr"] > smallest:
        # eta_t / C <= 1 keeps the DGD factor alpha I - (eta/C) a a^T a contraction,
        # which the bound on the memory states relies on (module docstring).
        raise ConfigError(f"model.self_modifying.lr={c['lr']} must be at most the smaller "
                          f"chunk size ({smallest}): a per-token step eta/C above 1 makes "
                          f"the DGD factor expanding and the memory states can diverge")
    clip = c["grad_clip"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
        raise ConfigError(f"model.self_modifying.grad_clip must be a number >= 0 (0: no "
                          f"clipping of the inner gradients), got {clip!r}")
    for key in DEFAULTS:
        if isinstance(DEFAULTS[key], bool) and not isinstance(c[key], bool):
            raise ConfigError(f"model.self_modifying.{key} must be True or False, "
                              f"got {c[key]!r}")
    return c


class SelfModifyingTitans(nnx.Module):
    """Hope's token mixer: ``y, state = mixer(x, state)`` (Eq. 83-93)."""

    streams_exactly = True   # at any cut

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = _config(cfg)
        self.spec = spec = _Spec(c)
        self.path = c["path"]
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim = h, d // h
        dh, hidden = self.head_dim, c["hidden_mult"] * (d // h)
        dtype = jnp.dtype(cfg.dtype)
        window = c["conv_window"]

        def proj():
            return Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)

        def conv():
            return CausalConv(d, window, rngs=rngs, axis_name="heads")

        self.convs = nnx.Dict()
        self.proj = nnx.Dict()
        streams = list(spec.plain_vectors) + (["u"] if spec.adaptive else [])
        for name in streams:
            self.proj[name] = proj()
            self.convs[name] = conv()
        self.gate_proj = nnx.Dict()
        for name in spec.plain_gates:
            self.gate_proj[name] = Dense(d, h, ("embed", "memory_heads"), rngs=rngs,
                                         use_bias=True)
        if spec.momentum:
            self.beta_proj = Dense(d, h, ("embed", "memory_heads"), rngs=rngs,
                                   use_bias=True, init=nnx.initializers.zeros)
            self.beta_proj.bias[...] = jnp.full((h,), 2.0, jnp.float32)
        self.wo = Dense(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)

        def memory_params():
            axes = memory_state_axes(3)
            if spec.kind == "linear":
                # Identity plus noise: with an exact identity every adaptive
                # memory would follow the same trajectory (same self-generated
                # values), so k, v, eta, alpha would stay tied forever.
                noise = nnx.initializers.normal(0.5 * dh ** -0.5)(
                    rngs.params(), (h, dh, dh), jnp.float32)
                init = jnp.eye(dh) + noise
                return nnx.Dict(w=param(rngs, init, (h, dh, dh), axes))
            return nnx.Dict(
                w2=param(rngs, nnx.initializers.normal(dh ** -0.5), (h, hidden, dh), axes),
                w1=param(rngs, nnx.initializers.normal(0.1 * hidden ** -0.5),
                         (h, dh, hidden), axes))

        self.memories = nnx.Dict({b: memory_params() for b in spec.adaptive})
        self.memories["memory"] = memory_params()
        self.readout = nnx.Dict()
        for box in GATE_BOXES:
            if box in spec.adaptive:
                bias = -2.0 if box == "eta" else 4.0
                self.readout[box] = nnx.Dict(
                    r=param(rngs, nnx.initializers.normal(dh ** -0.5), (h, dh),
                            ("memory_heads", None)),
                    b=param(rngs, jnp.asarray(bias, jnp.float32), (h,), ("memory_heads",)))
        for name in spec.plain_gates:
            bias = -2.0 if name == "eta" else 4.0
            self.gate_proj[name].bias[...] = jnp.full((h,), bias, jnp.float32)

    # -- state ------------------------------------------------------------
    def _initial_memory_state(self, batch: int):
        def expand(tree):
            return jax.tree.map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), tree)
        weights = {b: {n: gather_memory_state(p[...]) for n, p in self.memories[b].items()}
                   for b in self.memories}
        # Adaptive memories stacked on an axis after heads (order spec.adaptive): one
        # vmapped update instead of one traced copy per memory.
        other = expand(jax.tree.map(lambda *w: jnp.stack(w, axis=1),
                                    *[weights[b] for b in self.spec.adaptive])
                       if self.spec.adaptive else {})
        mem = expand(weights["memory"])

        def zeros(tree):
            return jax.tree.map(jnp.zeros_like, tree)

        mom_o = zeros(other) if self.spec.momentum else None
        mom_m = zeros(mem) if self.spec.momentum else None
        return dict(pos=jnp.zeros((), jnp.int32), other=(other, mom_o, other),
                    mem=(mem, mom_m, mem))

    def __call__(self, x: jax.Array, state: Any = None):
        b, t, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        streaming = state is not None
        conv_states = state["conv"] if streaming else {}
        mem_state = state["memory"] if streaming else self._initial_memory_state(b)
        new_conv = {}
        heads = {}
        for name in self.proj:
            y, new_conv[name] = self.convs[name](self.proj[name](x), conv_states.get(name))
            heads[name] = y.astype(jnp.float32).reshape(b, t, h, dh)
        plain = {n: heads[n] for n in self.spec.plain_vectors}
        for name in self.gate_proj:
            plain[name] = self.gate_proj[name](x.astype(jnp.float32))
        u = heads.get("u", jnp.zeros((b, t, h, dh), jnp.float32))
        log_beta = (jax.nn.log_sigmoid(self.beta_proj(x.astype(jnp.float32)))
                    if self.spec.momentum else None)
        readout = {box: (p["r"][...], p["b"][...]) for box, p in self.readout.items()}

        spec, path = self.spec, self.path

        def one_head(st, u_h, plain_h, lb_h, ro_h):
            if path == "oracle":
                return oracle_sequence(spec, st, u_h, plain_h, lb_h, ro_h)
            return chunked_sequence(spec, st, u_h, plain_h, lb_h, ro_h, streaming)

        # vmap over heads (axis 2 of [B, T, H, ...] inputs, 1 of [B, H, ...] states),
        # then over the batch.
        state_axes = dict(pos=None, other=0, mem=0)
        per_head = jax.vmap(one_head, in_axes=(state_axes, 1, 1, 1 if log_beta is not None
                                               else None, 0),
                            out_axes=(1, state_axes))
        state_axes_b = dict(pos=None, other=0, mem=0)
        per_batch = jax.vmap(per_head, in_axes=(state_axes_b, 0, 0,
                                                0 if log_beta is not None else None, None),
                             out_axes=(0, state_axes_b))
        y, mem_state = per_batch(mem_state, u, plain, log_beta, readout)
        y = constrain(y.reshape(b, t, h * dh).astype(x.dtype), ("batch", "length", "heads"))
        return self.wo(y), dict(conv=new_conv, memory=mem_state)
