"""The production path: the chunked dual form of the memory rule, one head.

Same semantics as ``oracle.py``: within a chunk every step direction is taken
at the chunk-start state (M_0, S_0), and y_t = M_t(q_t) reads the memory after
the token's own update.  Every per-token step of every layer is rank one,
E_j X_j^T (X_l: the layer's inputs on the keys, E_l: the gradient w.r.t. its
linear output), so with the gate matrices of ``gates.py``:

    state:  W_l <- end_beta W_l + end_f S_l - E_l^T diag(G[end]) X_l
            S_l <- end_m S_l - E_l^T diag(Le[end] * theta) X_l
    output: layer by layer, Z_0 = Q, Z_{l+1} = act(U_l), y = q + U_{L-1} with
            U_l = beta * (Z_l W_l^T) + f * (Z_l S_l^T) - ((Z_l X_l^T) * G) E_l

(docs/equations.md section 1 for the linear memory; for the MLP the TTT dual form,
generalised by the momentum/decay gate matrix G: Titans Eq. 13-14 and 16-18
layer by layer).  The errors are the objective's gradient back-propagated
through the chunk-start map (Titans Eq. 12 for "l2"),

    lin_l = X_l W_l^T,  X_{l+1} = act(lin_l),  pred = k + lin_{L-1} (MLP),
    E_{L-1} = dl/dpred,  E_{l-1} = (E_l W_l) * act'(lin_{l-1}),

plus lin_l itself with DGD, each row clipped with ``spec.grad_clip``.

DGD with chunks: the preconditioner term W_l x_l x_l^T is, like the gradient,
taken at the chunk-start state (x_l is layer l's input at M_0), as NL section
8.2 computes everything in a chunk from the previous chunk's end state.  The
step of token t is then theta_t (grad + M_0 k k^T), a rank-one term that the
same gate matrices combine; with C = 1 it is exactly NL Eq. 57
(W (I - theta k k^T) - theta grad, plus momentum and decay).

Execution (choices measured on XLA:CPU):

* one ``lax.scan`` over chunks, rematerialised every ``spec.remat_every``
  chunks, carries the fp32 state and computes each chunk's outputs from the
  state it holds: nothing of size (chunks x state) is emitted, and every
  product is a small GEMM batched over (batch, head) only, which runs near the
  core's peak (the same products batched over all chunks after the scan ran
  4-7x slower);
* the chunk step has a hand-written VJP (``_step``).  Autodiff of the step
  differentiates the errors' own back-propagation a second time and forms
  every weight gradient as a contraction over the token axis of two
  token-major operands, a layout XLA:CPU runs 2-3x slower; the VJP below
  reuses the forward's intermediates and chooses each product's layout;
* the state is carried per layer as separate arrays (W_l, S_l), or (W_l,)
  without momentum (stacking them to share GEMMs cost more in slices,
  concatenations and carry copies than it saved); layer 0's are carried
  transposed, W_0^T and S_0^T ``[d_k, out]``, so that its steps K^T (E * a)
  and the products K W_0^T, Q W_0^T, Q S_0^T need no transposition; the other
  products transpose only token-major arrays (``_transposed``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory import maps
from nl_jax.memory.gates import ChunkGates, chunk_gates
from nl_jax.memory.objectives import objective_error
from nl_jax.memory.scan import grouped_scan, pad_leading
from nl_jax.memory.spec import MemorySpec


def _nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a b, ``[m, k] x [k, n]``."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a b^T, ``[m, k] x [n, k]``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _KernelBodySpec(MemorySpec):
    """A level's spec inside a Pallas kernel body (``kernel_heads``): the same chunk
    step without XLA layout barriers (Mosaic and Triton have none, and run no
    layout pass that would need one)."""


def _transposed(spec: MemorySpec, x: jax.Array) -> jax.Array:
    """x^T as an array of its own (the barrier keeps XLA from folding the
    transpose back into the consuming dot as a contraction over leading axes)."""
    return x.T if isinstance(spec, _KernelBodySpec) else jax.lax.optimization_barrier(x.T)


def _act_slope(x: jax.Array) -> jax.Array:
    """act'(x), elementwise."""
    return jax.jvp(maps.act, (x,), (jnp.ones_like(x),))[1]


def _add(total, term):
    """total + term, where a total of None is empty."""
    return term if total is None else total + term


def _times_transposed(x: jax.Array, part: jax.Array, layer: int) -> jax.Array:
    """x P^T ``[C, out]`` for a carried state part P of ``layer`` (layer 0's are
    carried as P^T)."""
    return _nn(x, part) if layer == 0 else _nt(x, part)


class _Chunk(NamedTuple):
    """Per-chunk inputs of the step: q, k, v ``[C, d]`` and the gates."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    gates: ChunkGates


class _Saved(NamedTuple):
    """The products of one chunk that its VJP keeps (module docstring), per layer:
    lin_l, E_l W_l (``back``, layers < L-1), Z_l X_l^T (``scores``),
    (Z_l W_l^T, Z_l S_l^T) (``projs``) and U_l.  The rest is pointwise in these
    (``_key_side``, ``_query_inputs``) and is recomputed rather than stored."""

    lins: tuple
    back: tuple
    scores: tuple
    projs: tuple
    us: tuple


class _KeySide(NamedTuple):
    """Key-side values of a chunk: X_l, pred, the objective's gradient
    back-propagated to each layer (``chain``, before DGD and clipping), E_l."""

    inputs: list
    pred: jax.Array
    chain: list
    errors: list


def _token_weights(g: ChunkGates, k: int) -> tuple:
    """The per-token weights of the steps of W and S: G[end], Le[end] * theta."""
    return (g.end_gate, g.end_momentum_gate)[:k]


def _decay(parts, g: ChunkGates) -> list:
    """[end_beta W + end_f S, end_m S] (or [end_beta W])."""
    if len(parts) == 1:
        return [g.end_beta * parts[0]]
    return [g.end_beta * parts[0] + g.end_f * parts[1], g.end_m * parts[1]]


def _with_dgd(spec: MemorySpec, chain: jax.Array, lin: jax.Array) -> jax.Array:
    """The step error before clipping: the objective's gradient (+ lin_l with DGD)."""
    return chain + lin if spec.dgd else chain


def _clip(spec: MemorySpec, errors: jax.Array, inputs: jax.Array) -> jax.Array:
    """Rows of ``errors`` scaled so that each E_j X_j^T has norm <= ``spec.grad_clip``."""
    return maps.clip_errors(errors, jnp.sum(inputs * inputs, -1), spec.grad_clip)


def _prediction(spec: MemorySpec, x: _Chunk, lins) -> jax.Array:
    """M_0(k): k + lin_{L-1} for the residual MLP, lin_{L-1} for the linear map."""
    return x.k + lins[-1] if spec.kind == "mlp" else lins[-1]


def _key_side(spec: MemorySpec, x: _Chunk, lins, back) -> _KeySide:
    """X_{l+1} = act(lin_l), E_{L-1} = dl/dpred and E_l = (E_{l+1} W_{l+1}) * act'(lin_l)
    from lin_l and ``back`` = E_{l+1} W_{l+1}; then DGD and clipping."""
    inputs = [x.k] + [maps.act(lin) for lin in lins[:-1]]
    pred = _prediction(spec, x, lins)
    chain = [b * _act_slope(lin) for b, lin in zip(back, lins[:-1], strict=True)]
    chain.append(objective_error(spec.objective, pred, x.v))
    errors = [_clip(spec, _with_dgd(spec, e, lin), xl)
              for e, lin, xl in zip(chain, lins, inputs, strict=True)]
    return _KeySide(inputs, pred, chain, errors)


def _query_inputs(x: _Chunk, us) -> list:
    """Z_0 = q, Z_{l+1} = act(U_l)."""
    return [x.q] + [maps.act(u) for u in us[:-1]]


def _step_forward(spec: MemorySpec, states, x: _Chunk):
    """One chunk: ((new states, y ``[C, d_v]``), ``_Saved``)."""
    g = x.gates
    n = len(states)
    z, lins = x.k, []
    for layer in range(n):
        lins.append(_times_transposed(z, states[layer][0], layer))
        if layer < n - 1:
            z = maps.act(lins[-1])
    chain = objective_error(spec.objective, _prediction(spec, x, lins), x.v)
    back = []
    for layer in range(n - 1, 0, -1):
        back.insert(0, _nn(chain, states[layer][0]))
        chain = back[0] * _act_slope(lins[layer - 1])
    inputs, _, _, errors = _key_side(spec, x, lins, back)

    z = x.q
    scores, projs, us = [], [], []
    for layer in range(n):
        projs.append(tuple(_times_transposed(z, part, layer) for part in states[layer]))
        scores.append(_nt(z, inputs[layer]))
        u = g.beta[:, None] * projs[-1][0] - _nn(scores[-1] * g.gate, errors[layer])
        if spec.momentum:
            u = u + g.f[:, None] * projs[-1][1]
        us.append(u)
        z = maps.act(u) if layer < n - 1 else u
    y = x.q + z if spec.kind == "mlp" else z

    new = []
    k_t = _transposed(spec, x.k)
    for layer in range(n):
        weights = _token_weights(g, len(states[layer]))
        if layer == 0:     # step^T = K^T diag(a) E
            steps = [_nn(k_t * a[None, :], errors[0]) for a in weights]
        else:              # step = (E * a)^T X
            e_t = _transposed(spec, errors[layer])
            steps = [_nn(e_t * a[None, :], inputs[layer]) for a in weights]
        new.append(tuple(p - st for p, st in zip(_decay(states[layer], g), steps,
                                                 strict=True)))
    saved = _Saved(tuple(lins), tuple(back), tuple(scores), tuple(projs), tuple(us))
    return (tuple(new), y), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _step(spec: MemorySpec, states, x: _Chunk):
    """One chunk of the recurrence: (states after it, y); VJP ``_step_backward``."""
    return _step_forward(spec, states, x)[0]


def _step_fwd(spec, states, x):
    """``_step`` and its residuals: the chunk-start states, the inputs, ``_Saved``."""
    out, saved = _step_forward(spec, states, x)
    return out, (states, x, saved)


class _Grads:
    """Cotangents accumulated by ``_step_backward``: per layer and state part
    (``states``), per layer w.r.t. X_l, E_l and lin_l, and per gate field."""

    def __init__(self, n: int, k: int):
        self.states = [[None] * k for _ in range(n)]
        self.inputs = [None] * n
        self.errors = [None] * n
        self.lins = [None] * n
        self.gates = dict.fromkeys(ChunkGates._fields)

    def add_state(self, layer: int, parts) -> None:
        self.states[layer] = [_add(a, b) for a, b in zip(self.states[layer], parts,
                                                         strict=True)]

    def add_gate(self, name: str, value: jax.Array) -> None:
        self.gates[name] = _add(self.gates[name], value)


def _update_vjp(states, x, key: _KeySide, d_new, grads: _Grads) -> None:
    """Through new = [end_beta W + end_f S, end_m S] - steps (``_step_forward``)."""
    g = x.gates
    for layer, parts in enumerate(states):
        dn = d_new[layer]
        grads.add_gate("end_beta", jnp.sum(parts[0] * dn[0]))
        if len(parts) == 2:
            grads.add_state(layer, [g.end_beta * dn[0], g.end_f * dn[0] + g.end_m * dn[1]])
            grads.add_gate("end_f", jnp.sum(parts[1] * dn[0]))
            grads.add_gate("end_m", jnp.sum(parts[1] * dn[1]))
        else:
            grads.add_state(layer, [g.end_beta * dn[0]])
        errors = key.errors[layer]
        names = ("end_gate", "end_momentum_gate")[:len(parts)]
        for name, a, d_step in zip(names, _token_weights(g, len(parts)), dn, strict=True):
            scaled = errors * a[:, None]
            if layer == 0:   # step^T = K^T diag(a) E, d_step = -d(step^T)
                d_scaled = -_nn(x.k, d_step)
                d_x = -_nt(scaled, d_step)
            else:            # step = (E * a)^T X
                d_scaled = -_nt(key.inputs[layer], d_step)
                d_x = -_nn(scaled, d_step)
            grads.inputs[layer] = _add(grads.inputs[layer], d_x)
            grads.errors[layer] = _add(grads.errors[layer], d_scaled * a[:, None])
            grads.add_gate(name, jnp.sum(errors * d_scaled, -1))


def _outputs_vjp(spec, states, x, s: _Saved, key: _KeySide, dy, grads: _Grads):
    """Through the outputs U_l, last layer first; returns dq."""
    g = x.gates
    zs = _query_inputs(x, s.us)
    dz = dy
    for layer in range(len(states) - 1, -1, -1):
        du = dz if layer == len(states) - 1 else dz * _act_slope(s.us[layer])
        d_gated_scores = -_nt(du, key.errors[layer])
        grads.add_gate("gate", d_gated_scores * s.scores[layer])
        d_scores = d_gated_scores * g.gate
        grads.errors[layer] = (grads.errors[layer]
                               - _nn(_transposed(spec, s.scores[layer] * g.gate), du))
        grads.inputs[layer] = grads.inputs[layer] + _nn(_transposed(spec, d_scores), zs[layer])
        dz = _nn(d_scores, key.inputs[layer])
        d_parts = []
        z_t = _transposed(spec, x.q) if layer == 0 else None
        k = len(states[layer])
        for name, coef, proj, part in zip(("beta", "f")[:k], (g.beta, g.f)[:k],
                                          s.projs[layer], states[layer], strict=True):
            grads.add_gate(name, jnp.sum(proj * du, -1))
            d_proj = coef[:, None] * du
            if layer == 0:   # proj = Q P^T with P^T carried
                dz = dz + _nt(d_proj, part)
                d_parts.append(_nn(z_t, d_proj))
            else:
                dz = dz + _nn(d_proj, part)
                d_parts.append(_nn(_transposed(spec, d_proj), zs[layer]))
        grads.add_state(layer, d_parts)
    return dz + dy if spec.kind == "mlp" else dz


def _errors_vjp(spec, states, x, s: _Saved, key: _KeySide,
                grads: _Grads) -> tuple[jax.Array, jax.Array]:
    """Through clipping, DGD, E_{l-1} = (E_l W_l) * act'(lin_{l-1}), the objective
    and the key-side forward; returns (dk, dv)."""
    n = len(states)
    d_chain = [None] * n
    for layer in range(n):
        if spec.grad_clip > 0:
            _, clip_vjp = jax.vjp(functools.partial(_clip, spec),
                                  _with_dgd(spec, key.chain[layer], s.lins[layer]),
                                  key.inputs[layer])
            d_chain[layer], d_x = clip_vjp(grads.errors[layer])
            grads.inputs[layer] = grads.inputs[layer] + d_x
        else:
            d_chain[layer] = grads.errors[layer]
        if spec.dgd:
            grads.lins[layer] = d_chain[layer]
    for layer in range(n - 1):
        upper = layer + 1
        slope, slope_vjp = jax.vjp(_act_slope, s.lins[layer])
        d_back = d_chain[layer] * slope
        grads.lins[layer] = _add(grads.lins[layer],
                                 slope_vjp(d_chain[layer] * s.back[layer])[0])
        d_chain[upper] = d_chain[upper] + _nt(d_back, states[upper][0])
        grads.states[upper][0] = grads.states[upper][0] + _nn(
            _transposed(spec, key.chain[upper]), d_back)
    _, objective_vjp = jax.vjp(functools.partial(objective_error, spec.objective),
                               key.pred, x.v)
    d_pred, dv = objective_vjp(d_chain[n - 1])

    grads.lins[n - 1] = _add(grads.lins[n - 1], d_pred)
    dk = grads.inputs[0] + d_pred if spec.kind == "mlp" else grads.inputs[0]
    for layer in range(n - 1, -1, -1):
        weight = states[layer][0]
        if layer == 0:
            dk = dk + _nt(grads.lins[0], weight)
            grads.states[0][0] = grads.states[0][0] + _nn(_transposed(spec, x.k), grads.lins[0])
        else:
            d_x = grads.inputs[layer] + _nn(grads.lins[layer], weight)
            grads.states[layer][0] = grads.states[layer][0] + _nn(
                _transposed(spec, grads.lins[layer]), key.inputs[layer])
            grads.lins[layer - 1] = _add(grads.lins[layer - 1],
                                         d_x * _act_slope(s.lins[layer - 1]))
    return dk, dv


def _step_backward(spec: MemorySpec, residuals, cotangents):
    """The VJP of ``_step_forward``, written out (every product a b or a b^T, the
    pointwise parts (objective, activation, clipping) by ``jax.vjp``)."""
    states, x, s = residuals
    d_new, dy = cotangents
    key = _key_side(spec, x, s.lins, s.back)
    grads = _Grads(len(states), len(states[0]))
    _update_vjp(states, x, key, d_new, grads)
    dq = _outputs_vjp(spec, states, x, s, key, dy, grads)
    dk, dv = _errors_vjp(spec, states, x, s, key, grads)
    d_gates = ChunkGates(**{name: jnp.zeros_like(getattr(x.gates, name)) if value is None
                            else value for name, value in grads.gates.items()})
    return tuple(tuple(parts) for parts in grads.states), _Chunk(dq, dk, dv, d_gates)


_step.defvjp(_step_fwd, _step_backward)


def chunked_head(spec: MemorySpec, weights, momentum, q, k, v, theta, eta, alpha,
                 n_valid):
    """One head: inputs ``[N, C, ...]``, ``n_valid`` ``[N]`` real tokens per chunk.

    Returns (y ``[N, C, d_v]``, (weights, momentum) after the last real token).
    """
    n = q.shape[0]
    gates = jax.vmap(chunk_gates, in_axes=(0, 0, 0, 0, None, None))(
        theta, eta, alpha, n_valid, spec.momentum, spec.weight_decay)
    group = spec.remat_every
    total = -(-n // group) * group
    # padded chunks leave the state unchanged (end gates 1, 0, 1, 0, 0)
    fills = ChunkGates(beta=0.0, f=0.0, gate=0.0, end_beta=1.0, end_f=0.0, end_m=1.0,
                       end_gate=0.0, end_momentum_gate=0.0)
    chunks = _Chunk(pad_leading(q, total), pad_leading(k, total), pad_leading(v, total),
                    jax.tree.map(lambda a, fill: pad_leading(a, total, fill), gates, fills))
    k_parts = 2 if spec.momentum else 1
    states = tuple(tuple(p.T if layer == 0 else p for p in (w, s)[:k_parts])
                   for layer, (w, s) in enumerate(zip(weights, momentum, strict=True)))
    states, y = grouped_scan(functools.partial(_step, spec), states, chunks, group)
    states = tuple(tuple(p.T if layer == 0 else p for p in parts)
                   for layer, parts in enumerate(states))
    final = tuple(zip(*states, strict=True))
    return y[:n], final if spec.momentum else (final[0], tuple(momentum))


def kernel_heads(spec: MemorySpec, weights, momentum, q, k, v, theta, eta, alpha, n_valid,
                 interpret: bool | None = None):
    """``chunked_head`` for every (batch, head) at once, with the recurrence over chunks
    in the chunk-scan kernels (``kernels/chunk_scan.py``: forward and backward in
    Pallas, ``spec.remat_every`` chunks per saved boundary state).

    Inputs chunk-major ``[N, B, H, C, ...]``, ``n_valid`` ``[N]``; weights and
    momentum per layer ``[B, H, out, in]``.  Returns (y ``[N, B, H, C, d_v]``,
    (weights, momentum) after the last real token).
    """
    from nl_jax_kernels.chunk_scan import chunk_scan

    n, b, h = q.shape[:3]
    valid = jnp.broadcast_to(n_valid[:, None, None], (n, b, h))
    gates = jax.vmap(jax.vmap(jax.vmap(chunk_gates, in_axes=(0, 0, 0, 0, None, None)),
                              in_axes=(0, 0, 0, 0, None, None)),
                     in_axes=(0, 0, 0, 0, None, None))(
        theta, eta, alpha, valid, spec.momentum, spec.weight_decay)
    k_parts = 2 if spec.momentum else 1
    states = tuple(tuple(jnp.swapaxes(p, -1, -2) if layer == 0 else p
                         for p in (w, s)[:k_parts])
                   for layer, (w, s) in enumerate(zip(weights, momentum, strict=True)))
    body_spec = _KernelBodySpec(**dataclasses.asdict(spec))
    y, states = chunk_scan(functools.partial(_step, body_spec), states, _Chunk(q, k, v, gates),
                           save_every=spec.remat_every, interpret=interpret,
                           triton=False)    # (Pallas Triton lowers no custom_vjp)
    states = tuple(tuple(jnp.swapaxes(p, -1, -2) if layer == 0 else p for p in parts)
                   for layer, parts in enumerate(states))
    final = tuple(zip(*states, strict=True))
    return y, final if spec.momentum else (final[0], tuple(momentum))
