"""The production path: the chunked dual form of the memory rule, one head.

Same semantics as ``oracle.py``: within a chunk every step direction is taken
at the chunk-start state (M_0, S_0), and y_t = M_t(q_t) reads the memory after
the token's own update.  Every per-token step of every layer is rank one,
E_j X_j^T (``maps.layer_directions``), so with the gate matrices of
``gates.py``:

    state:  W_l <- end_beta W_l + end_f S_l - E_l^T diag(G[end]) X_l
            S_l <- end_m S_l - E_l^T diag(Le[end] * theta) X_l
    output: layer by layer, beta_i W_l z_i + f_i S_l z_i - ((Z X_l^T) * G) E_l

(NL_MATH.md section 1 for the linear memory; the TTT dual form, generalised by
the momentum/decay gate matrix G, for the MLP).  The sequential scan carries
only the fp32 state and is rematerialised every ``spec.remat_every`` chunks;
the chunk-start states it emits (O(T/C) of them) and the per-token errors E
(and hidden-layer inputs X) feed one batched computation of all outputs.

DGD with chunks: the preconditioner term W_l x_l x_l^T is, like the gradient,
taken at the chunk-start state (x_l is layer l's input at M_0), as NL section
8.2 computes everything in a chunk from the previous chunk's end state.  The
step of token t is then theta_t (grad + M_0 k k^T), a rank-one term that the
same gate matrices combine; with C = 1 it is exactly NL Eq. 57
(W (I - theta k k^T) - theta grad, plus momentum and decay).
"""

from __future__ import annotations

import jax

from nl_jax.memory import maps
from nl_jax.memory.gates import chunk_gates
from nl_jax.memory.scan import grouped_scan, pad_leading
from nl_jax.memory.spec import MemorySpec


def chunked_head(spec: MemorySpec, weights, momentum, q, k, v, theta, eta, alpha,
                 n_valid):
    """One head: inputs ``[N, C, ...]``, ``n_valid`` ``[N]`` real tokens per chunk.

    Returns (y ``[N, C, d_v]``, (weights, momentum) after the last real token).
    """
    n = q.shape[0]
    gates = jax.vmap(chunk_gates, in_axes=(0, 0, 0, 0, None, None))(
        theta, eta, alpha, n_valid, spec.momentum, spec.weight_decay)

    def step(carry, xs):
        w, s = carry
        k_c, v_c, e_beta, e_f, e_m, e_gate, e_mgate = xs
        inputs, errors = maps.layer_directions(spec, w, k_c, v_c)
        w_new = []
        s_new = []
        for w_l, s_l, x_l, err_l in zip(w, s, inputs, errors, strict=True):
            if spec.momentum:
                step_w, step_s = maps.rank_one_sums(err_l, x_l, (e_gate, e_mgate))
                w_new.append(e_beta * w_l + e_f * s_l - step_w)
                s_new.append(e_m * s_l - step_s)
            else:
                (step_w,) = maps.rank_one_sums(err_l, x_l, (e_gate,))
                w_new.append(e_beta * w_l - step_w)
                s_new.append(s_l)
        # the first layer's input is k itself: emit only the hidden layers' inputs
        return (tuple(w_new), tuple(s_new)), (w, s, tuple(inputs[1:]), tuple(errors))

    group = spec.remat_every
    total = -(-n // group) * group
    xs = (pad_leading(k, total), pad_leading(v, total),
          pad_leading(gates.end_beta, total, 1.0), pad_leading(gates.end_f, total),
          pad_leading(gates.end_m, total, 1.0), pad_leading(gates.end_gate, total),
          pad_leading(gates.end_momentum_gate, total))
    final, per_chunk = grouped_scan(step, (tuple(weights), tuple(momentum)), xs, group)
    w_starts, s_starts, hidden_inputs, errors = jax.tree.map(lambda x: x[:n], per_chunk)

    def chunk_outputs(w, s, hidden, err, q_c, k_c, beta, f, gate):
        return maps.dual_form_outputs(spec, w, s, (k_c,) + tuple(hidden), err, q_c, beta,
                                      f, gate, spec.momentum)

    y = jax.vmap(chunk_outputs)(w_starts, s_starts, hidden_inputs, errors, q, k,
                                gates.beta, gates.f, gates.gate)
    return y, final
