"""Pallas kernels, forward and backward, for a scan over chunks: the one kernel family
behind every chunked token-clock level (Titans linear and MLP memories, Hope's
self-modifying memories).

Every chunked level of ``nl_jax/memory`` is a recurrence over the chunks of each
(batch, head) sequence,

    (S_{n+1}, y_n) = step(S_n, x_n),      n = 0 .. N-1,

where ``S`` is the level's state (a pytree of fp32 arrays: weights, momentum,
anchors), ``x_n`` the chunk's state-independent inputs (keys, values, queries,
gate matrices and rows, built by XLA for all chunks at once) and ``step`` the
level's chunk maths written in jnp (``nl_jax/memory``: the dual form, the WY
form of DGD).  This module runs that recurrence with the state resident on
chip, for any such ``step``:

* ``reference``: the recurrence in jnp, a ``lax.scan`` over chunks of ``step``
  batched over (B, H), each chunk rematerialised;
* ``_mosaic_forward`` (TPU): grid (B, H, N), chunk axis sequential, the state
  in VMEM scratch across it;  every ``save_every``-th chunk-start state is
  written out (the boundary states of the backward);
* ``_mosaic_backward`` (TPU): grid (B, H, N / save_every) walked from the last
  segment to the first.  Each program recomputes its segment's chunk-start
  states from the saved boundary into VMEM (one forward step per chunk), then
  walks the segment backwards through ``jax.vjp(step)`` at those states,
  carrying the state's cotangent in VMEM across segments: every input, every
  gate and the initial state get their gradient, and no per-chunk state ever
  goes to HBM;
* ``_triton_forward`` / ``_triton_backward`` (CUDA GPUs): grid (B, H), one
  program looping over the chunks (Triton programs run in parallel, so the
  chunk axis cannot be a grid axis).  Triton has no scratch memory that a
  program can index, so the backward recomputes each chunk's start state from
  its segment boundary (at most ``save_every - 1`` extra steps per chunk; keep
  ``save_every`` small on GPUs).  Every per-(batch, head) dimension must be a
  power of two (Triton blocks); ``chunk_scan`` says so otherwise;
* ``chunk_scan``: the dispatch function, a ``custom_vjp`` (kernel forward,
  kernel backward), with the body chosen when the program is lowered for its
  platform (``lax.platform_dependent``): Mosaic on a TPU, Triton on a CUDA GPU,
  the Mosaic bodies in Pallas interpret mode on the CPU (tests).  An
  ahead-of-time compile for a TPU topology from a CPU host therefore compiles
  the Mosaic kernels.

Layout: ``states`` leaves are ``[B, H, ...]``, ``xs`` leaves ``[N, B, H, ...]``
(chunk-major), outputs ``[N, B, H, ...]``.  Per-(batch, head) shapes of rank
below 2 travel as ``[1, ..]`` blocks (Mosaic tiles the last two axes) and bool
leaves as int32; ``step`` sees the original shapes and dtypes.  ``step`` must be
a hashable callable (a module-level function or a ``functools.partial`` of one
with hashable arguments) that captures no arrays.

Memory: the forward keeps ceil(N / save_every) states per (batch, head) for
the backward, and the Mosaic backward save_every states in VMEM; with
save_every = 1 no forward step is recomputed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

BACKENDS = ("cpu", "tpu", "gpu")       # gpu: CUDA (Triton); the CPU interprets
BODIES = ("mosaic", "triton")
DEFAULT_SCOPED_VMEM = 16 * 2**20       # Mosaic's default scoped-VMEM budget
MAX_SCOPED_VMEM = 100 * 2**20


# --------------------------------------------------------------------------
# The reference.
# --------------------------------------------------------------------------

def reference(step, states, xs):
    """The recurrence in jnp: ``lax.scan`` over chunks of ``step`` batched over
    (B, H), each chunk rematerialised.  Returns (ys ``[N, B, H, ...]``, final
    states)."""
    batched = jax.vmap(jax.vmap(step))

    @jax.checkpoint
    def body(carry, x):
        carry, y = batched(carry, x)
        return carry, y

    final, ys = jax.lax.scan(body, states, xs)
    return ys, final


# --------------------------------------------------------------------------
# Leaves as kernel blocks.
# --------------------------------------------------------------------------

def _block_shape(shape: tuple) -> tuple:
    """A per-(batch, head) shape as a block of rank >= 2."""
    return tuple(shape) if len(shape) >= 2 else (1,) * (2 - len(shape)) + tuple(shape)


def _to_kernel(x: jax.Array, lead: int) -> jax.Array:
    """``x`` with ``lead`` leading axes as the kernel stores it (rank >= 2 after
    them, bool as int32)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.int32)
    return x.reshape(x.shape[:lead] + _block_shape(x.shape[lead:]))


def _from_block(value: jax.Array, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    """A block read from a kernel ref as ``step`` sees it."""
    value = value.reshape(leaf.shape)
    return value != 0 if leaf.dtype == jnp.bool_ else value


def _to_block(value: jax.Array) -> jax.Array:
    """A value of ``step`` as the kernel stores it."""
    if value.dtype == jnp.bool_:
        value = value.astype(jnp.int32)
    return value.reshape(_block_shape(value.shape))


def _struct(x: jax.Array, lead: int) -> jax.ShapeDtypeStruct:
    """The per-(batch, head) (and per-chunk) shape and dtype of a leaf."""
    return jax.ShapeDtypeStruct(x.shape[lead:], x.dtype)


def _differentiable(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


class _Plan:
    """Shapes of one ``chunk_scan``: the flattened state, input and output leaves
    per (batch, head) and chunk, and the sizes (N, B, H, save_every, segments)."""

    def __init__(self, step, states, xs, save_every: int):
        self.s_leaves, self.s_tree = jax.tree.flatten(states)
        self.x_leaves, self.x_tree = jax.tree.flatten(xs)
        if not self.x_leaves or not self.s_leaves:
            raise ValueError("chunk_scan needs at least one state and one input array")
        self.n, self.b, self.h = self.x_leaves[0].shape[:3]
        for x in self.x_leaves:
            if x.shape[:3] != (self.n, self.b, self.h):
                raise ValueError(f"chunk_scan: every input must be [N, B, H, ...] with the "
                                 f"same N, B, H; got {x.shape} and "
                                 f"{(self.n, self.b, self.h)}")
        for s in self.s_leaves:
            if s.shape[:2] != (self.b, self.h):
                raise ValueError(f"chunk_scan: every state must be [B, H, ...] with "
                                 f"B, H = {(self.b, self.h)}; got {s.shape}")
        self.s_structs = [_struct(s, 2) for s in self.s_leaves]
        self.x_structs = [_struct(x, 3) for x in self.x_leaves]
        one_state = jax.tree.unflatten(self.s_tree, self.s_structs)
        one_chunk = jax.tree.unflatten(self.x_tree, self.x_structs)
        new_state, y = jax.eval_shape(step, one_state, one_chunk)
        if jax.tree.structure(new_state) != self.s_tree or [
                (a.shape, a.dtype) for a in jax.tree.leaves(new_state)] != [
                (a.shape, a.dtype) for a in self.s_structs]:
            raise ValueError("chunk_scan: step must return a state of the input state's "
                             f"structure, shapes and dtypes; got {new_state}")
        self.y_structs, self.y_tree = jax.tree.flatten(y)
        self.save_every = max(1, min(int(save_every), self.n))
        self.segments = -(-self.n // self.save_every)
        self.step = step

    def states(self, values):
        return jax.tree.unflatten(self.s_tree, values)

    def chunk(self, values):
        return jax.tree.unflatten(self.x_tree, values)

    def run_step(self, state_blocks, chunk_blocks):
        """``step`` on kernel blocks: (new state blocks, y blocks)."""
        state = self.states([_from_block(v, s) for v, s in zip(state_blocks, self.s_structs,
                                                                strict=True)])
        chunk = self.chunk([_from_block(v, s) for v, s in zip(chunk_blocks, self.x_structs,
                                                               strict=True)])
        new, y = self.step(state, chunk)
        return ([_to_block(v) for v in jax.tree.leaves(new)],
                [_to_block(v) for v in jax.tree.leaves(y)])

    def vjp_step(self, state_blocks, chunk_blocks, ct_state_blocks, ct_y_blocks):
        """The VJP of ``step`` at (state, chunk): (state cotangent blocks, cotangent
        blocks of the differentiable chunk inputs)."""
        state = self.states([_from_block(v, s) for v, s in zip(state_blocks, self.s_structs,
                                                                strict=True)])
        chunk = self.chunk([_from_block(v, s) for v, s in zip(chunk_blocks, self.x_structs,
                                                               strict=True)])
        _, vjp = jax.vjp(self.step, state, chunk)
        ct_state = self.states([v.reshape(s.shape) for v, s in zip(
            ct_state_blocks, self.s_structs, strict=True)])
        ct_y = jax.tree.unflatten(self.y_tree, [v.reshape(s.shape) for v, s in zip(
            ct_y_blocks, self.y_structs, strict=True)])
        d_state, d_chunk = vjp((ct_state, ct_y))
        d_chunk = [d for d, s in zip(jax.tree.leaves(d_chunk), self.x_structs, strict=True)
                   if _differentiable(s.dtype)]
        return [_to_block(v) for v in jax.tree.leaves(d_state)], [_to_block(v)
                                                                   for v in d_chunk]

    @property
    def diff_x(self) -> list[int]:
        """Indices of the differentiable input leaves."""
        return [i for i, s in enumerate(self.x_structs) if _differentiable(s.dtype)]

    def vmem_limit(self, backward: bool) -> int | None:
        """A scoped-VMEM limit for one Mosaic grid step, or None when the default fits:
        the double-buffered blocks, the scratch and a few state-sized temporaries,
        with 50% headroom."""
        def size(structs, copies=1):
            return sum(math.prod(_block_shape(s.shape)) * 4 * copies for s in structs)
        chunk = size(self.x_structs) + size(self.y_structs)
        state = size(self.s_structs)
        if backward:
            need = 2 * self.save_every * 2 * chunk + (self.save_every + 4) * state
        else:
            need = 2 * chunk + 7 * state
        need += 4 * state + 4 * chunk
        need = int(1.5 * need)
        return None if need <= DEFAULT_SCOPED_VMEM else min(need, MAX_SCOPED_VMEM)


def _where(cond, new: list, old: list) -> list:
    return [jnp.where(cond, a, b) for a, b in zip(new, old, strict=True)]


# --------------------------------------------------------------------------
# Mosaic (TPU) bodies.
# --------------------------------------------------------------------------

def _mosaic_forward(plan: _Plan, s_in: list, x_in: list, *, save: bool, interpret: bool):
    """Grid (B, H, N): (ys, final states[, boundary states ``[S, B, H, ...]``])."""
    ns, nx, ny = len(s_in), len(x_in), len(plan.y_structs)
    k = plan.save_every

    def kernel(*refs):
        x_refs, refs = refs[:nx], refs[nx:]
        init_refs, refs = refs[:ns], refs[ns:]
        y_refs, refs = refs[:ny], refs[ny:]
        final_refs, refs = refs[:ns], refs[ns:]
        bound_refs = refs[:ns] if save else ()
        scratch = refs[-ns:]
        i = pl.program_id(2)

        @pl.when(i == 0)
        def _():
            for vmem, init in zip(scratch, init_refs, strict=True):
                vmem[...] = init[...]

        states = [vmem[...] for vmem in scratch]
        if save:
            @pl.when(jax.lax.rem(i, k) == 0)
            def _():
                for out, value in zip(bound_refs, states, strict=True):
                    out[...] = value

        new, ys = plan.run_step(states, [r[...] for r in x_refs])
        for out, value in zip(y_refs, ys, strict=True):
            out[...] = value
        for vmem, value in zip(scratch, new, strict=True):
            vmem[...] = value

        @pl.when(i == pl.num_programs(2) - 1)
        def _():
            for out, value in zip(final_refs, new, strict=True):
                out[...] = value

    def per_chunk(shape):
        return pl.BlockSpec((None, None, None) + shape,
                            lambda bi, hi, ni: (ni, bi, hi) + (0,) * len(shape))

    def per_head(shape):
        return pl.BlockSpec((None, None) + shape, lambda bi, hi, ni: (bi, hi) + (0,) * len(shape))

    def per_segment(shape):
        return pl.BlockSpec((None, None, None) + shape,
                            lambda bi, hi, ni: (jax.lax.div(ni, k), bi, hi) + (0,) * len(shape))

    s_shapes = [_block_shape(s.shape) for s in plan.s_structs]
    y_shapes = [_block_shape(s.shape) for s in plan.y_structs]
    in_specs = [per_chunk(x.shape[3:]) for x in x_in] + [per_head(s) for s in s_shapes]
    out_specs = [per_chunk(s) for s in y_shapes] + [per_head(s) for s in s_shapes]
    out_shape = ([jax.ShapeDtypeStruct((plan.n, plan.b, plan.h) + s, _kernel_dtype(y.dtype))
                  for s, y in zip(y_shapes, plan.y_structs, strict=True)]
                 + [jax.ShapeDtypeStruct((plan.b, plan.h) + s, x.dtype)
                    for s, x in zip(s_shapes, s_in, strict=True)])
    if save:
        out_specs += [per_segment(s) for s in s_shapes]
        out_shape += [jax.ShapeDtypeStruct((plan.segments, plan.b, plan.h) + s, x.dtype)
                      for s, x in zip(s_shapes, s_in, strict=True)]
    out = pl.pallas_call(
        kernel, grid=(plan.b, plan.h, plan.n), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(s, x.dtype) for s, x in zip(s_shapes, s_in, strict=True)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=plan.vmem_limit(backward=False)),
        interpret=interpret, name="chunk_scan_forward")(*x_in, *s_in)
    return out[:ny], out[ny:ny + ns], out[ny + ns:]


def _mosaic_backward(plan: _Plan, x_in: list, bounds: list, ct_y: list, ct_final: list,
                     *, interpret: bool):
    """Grid (B, H, S), segments last to first: (d initial states, d inputs)."""
    ns, nx, ny = len(bounds), len(x_in), len(ct_y)
    k, segs, n = plan.save_every, plan.segments, plan.n
    diff = plan.diff_x

    def kernel(*refs):
        x_refs, refs = refs[:nx], refs[nx:]
        bound_refs, refs = refs[:ns], refs[ns:]
        cty_refs, refs = refs[:ny], refs[ny:]
        ctf_refs, refs = refs[:ns], refs[ns:]
        dx_refs, refs = refs[:len(diff)], refs[len(diff):]
        dinit_refs, refs = refs[:ns], refs[ns:]
        stash, carry = refs[:ns], refs[ns:2 * ns]
        s = pl.program_id(2)
        seg = segs - 1 - s

        @pl.when(s == 0)
        def _():
            for vmem, ct in zip(carry, ctf_refs, strict=True):
                vmem[...] = ct[...]

        def recompute(j, states):
            for vmem, value in zip(stash, states, strict=True):
                vmem[j] = value
            new, _ = plan.run_step(states, [r[j] for r in x_refs])
            return _where(seg * k + j < n, new, states)

        jax.lax.fori_loop(0, k, recompute, [r[...] for r in bound_refs])

        def walk_back(jj, ct):
            j = k - 1 - jj
            d_state, d_chunk = plan.vjp_step([vmem[j] for vmem in stash],
                                             [r[j] for r in x_refs], ct,
                                             [r[j] for r in cty_refs])
            for out, value in zip(dx_refs, d_chunk, strict=True):
                out[j] = value.astype(out.dtype)
            return _where(seg * k + j < n, d_state, ct)

        ct = jax.lax.fori_loop(0, k, walk_back, [vmem[...] for vmem in carry])
        for vmem, value in zip(carry, ct, strict=True):
            vmem[...] = value

        @pl.when(s == segs - 1)
        def _():
            for out, value in zip(dinit_refs, ct, strict=True):
                out[...] = value

    def per_segment_chunks(shape):
        return pl.BlockSpec((k, None, None) + shape,
                            lambda bi, hi, si: (segs - 1 - si, bi, hi) + (0,) * len(shape))

    def per_segment(shape):
        return pl.BlockSpec((None, None, None) + shape,
                            lambda bi, hi, si: (segs - 1 - si, bi, hi) + (0,) * len(shape))

    def per_head(shape):
        return pl.BlockSpec((None, None) + shape, lambda bi, hi, si: (bi, hi) + (0,) * len(shape))

    s_shapes = [b.shape[3:] for b in bounds]
    in_specs = ([per_segment_chunks(x.shape[3:]) for x in x_in]
                + [per_segment(s) for s in s_shapes]
                + [per_segment_chunks(c.shape[3:]) for c in ct_y]
                + [per_head(s) for s in s_shapes])
    out_specs = [per_segment_chunks(x_in[i].shape[3:]) for i in diff] + [
        per_head(s) for s in s_shapes]
    out_shape = ([jax.ShapeDtypeStruct(x_in[i].shape, x_in[i].dtype) for i in diff]
                 + [jax.ShapeDtypeStruct((plan.b, plan.h) + s, b.dtype)
                    for s, b in zip(s_shapes, bounds, strict=True)])
    scratch = ([pltpu.VMEM((k,) + s, b.dtype) for s, b in zip(s_shapes, bounds, strict=True)]
               + [pltpu.VMEM(s, b.dtype) for s, b in zip(s_shapes, bounds, strict=True)])
    out = pl.pallas_call(
        kernel, grid=(plan.b, plan.h, segs), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=plan.vmem_limit(backward=True)),
        interpret=interpret, name="chunk_scan_backward")(*x_in, *bounds, *ct_y, *ct_final)
    return out[len(diff):], out[:len(diff)]


# --------------------------------------------------------------------------
# Triton (CUDA GPU) bodies.
# --------------------------------------------------------------------------

def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def triton_shapes_ok(plan: _Plan) -> bool:
    """Whether every per-(batch, head) dimension is a power of two of at least 16
    (Triton blocks; ``tl.dot`` takes no smaller operand)."""
    shapes = [s.shape for s in plan.s_structs + plan.x_structs + plan.y_structs]
    return all(_is_pow2(d) and d >= 16 for shape in shapes for d in shape)


def _triton_params(plan: _Plan):
    state = sum(math.prod(s.shape) for s in plan.s_structs)
    return pltr.CompilerParams(num_warps=4 if state <= 2 * 64 * 64 else 8, num_stages=1)


def _triton_forward(plan: _Plan, s_in: list, x_in: list, *, save: bool, interpret: bool):
    """Grid (B, H), one program looping over the chunks with the state in registers."""
    ns, nx, ny = len(s_in), len(x_in), len(plan.y_structs)
    k, n = plan.save_every, plan.n

    def kernel(*refs):
        x_refs, refs = refs[:nx], refs[nx:]
        init_refs, refs = refs[:ns], refs[ns:]
        y_refs, refs = refs[:ny], refs[ny:]
        final_refs, bound_refs = refs[:ns], refs[ns:]

        def body(i, states):
            if save:
                @pl.when(jax.lax.rem(i, k) == 0)
                def _():
                    for out, value in zip(bound_refs, states, strict=True):
                        out[jax.lax.div(i, k)] = value
            new, ys = plan.run_step(states, [r[i] for r in x_refs])
            for out, value in zip(y_refs, ys, strict=True):
                out[i] = value
            return new

        final = jax.lax.fori_loop(0, n, body, [r[...] for r in init_refs])
        for out, value in zip(final_refs, final, strict=True):
            out[...] = value

    def every(lead, shape):
        return pl.BlockSpec((lead, None, None) + shape,
                            lambda bi, hi: (0, bi, hi) + (0,) * len(shape))

    def per_head(shape):
        return pl.BlockSpec((None, None) + shape, lambda bi, hi: (bi, hi) + (0,) * len(shape))

    s_shapes = [_block_shape(s.shape) for s in plan.s_structs]
    y_shapes = [_block_shape(s.shape) for s in plan.y_structs]
    in_specs = [every(n, x.shape[3:]) for x in x_in] + [per_head(s) for s in s_shapes]
    out_specs = [every(n, s) for s in y_shapes] + [per_head(s) for s in s_shapes]
    out_shape = ([jax.ShapeDtypeStruct((n, plan.b, plan.h) + s, _kernel_dtype(y.dtype))
                  for s, y in zip(y_shapes, plan.y_structs, strict=True)]
                 + [jax.ShapeDtypeStruct((plan.b, plan.h) + s, x.dtype)
                    for s, x in zip(s_shapes, s_in, strict=True)])
    if save:
        out_specs += [every(plan.segments, s) for s in s_shapes]
        out_shape += [jax.ShapeDtypeStruct((plan.segments, plan.b, plan.h) + s, x.dtype)
                      for s, x in zip(s_shapes, s_in, strict=True)]
    out = pl.pallas_call(kernel, grid=(plan.b, plan.h), in_specs=in_specs,
                         out_specs=out_specs, out_shape=out_shape,
                         compiler_params=_triton_params(plan), interpret=interpret,
                         name="chunk_scan_forward_gpu")(*x_in, *s_in)
    return out[:ny], out[ny:ny + ns], out[ny + ns:]


def _triton_backward(plan: _Plan, x_in: list, bounds: list, ct_y: list, ct_final: list,
                     *, interpret: bool):
    """Grid (B, H): segments last to first, each chunk's start state recomputed from
    its segment's boundary."""
    ns, nx, ny = len(bounds), len(x_in), len(ct_y)
    k, segs, n = plan.save_every, plan.segments, plan.n
    diff = plan.diff_x

    def kernel(*refs):
        x_refs, refs = refs[:nx], refs[nx:]
        bound_refs, refs = refs[:ns], refs[ns:]
        cty_refs, refs = refs[:ny], refs[ny:]
        ctf_refs, refs = refs[:ns], refs[ns:]
        dx_refs, dinit_refs = refs[:len(diff)], refs[len(diff):]

        def walk_back(t, ct):          # t counts chunks from the last (padded) one
            index = segs * k - 1 - t
            seg, j = jax.lax.div(index, k), jax.lax.rem(index, k)

            def forward(i, states):
                new, _ = plan.run_step(states, [r[seg * k + i] for r in x_refs])
                return new

            start = jax.lax.fori_loop(0, j, forward, [r[seg] for r in bound_refs])
            d_state, d_chunk = plan.vjp_step(start, [r[index] for r in x_refs], ct,
                                             [r[index] for r in cty_refs])
            for out, value in zip(dx_refs, d_chunk, strict=True):
                out[index] = value.astype(out.dtype)
            return _where(index < n, d_state, ct)

        ct = jax.lax.fori_loop(0, segs * k, walk_back, [r[...] for r in ctf_refs])
        for out, value in zip(dinit_refs, ct, strict=True):
            out[...] = value

    def every(lead, shape):
        return pl.BlockSpec((lead, None, None) + shape,
                            lambda bi, hi: (0, bi, hi) + (0,) * len(shape))

    def per_head(shape):
        return pl.BlockSpec((None, None) + shape, lambda bi, hi: (bi, hi) + (0,) * len(shape))

    total = segs * k
    s_shapes = [b.shape[3:] for b in bounds]
    in_specs = ([every(total, x.shape[3:]) for x in x_in]
                + [every(segs, s) for s in s_shapes]
                + [every(total, c.shape[3:]) for c in ct_y]
                + [per_head(s) for s in s_shapes])
    out_specs = [every(total, x_in[i].shape[3:]) for i in diff] + [per_head(s)
                                                                    for s in s_shapes]
    out_shape = ([jax.ShapeDtypeStruct(x_in[i].shape, x_in[i].dtype) for i in diff]
                 + [jax.ShapeDtypeStruct((plan.b, plan.h) + s, b.dtype)
                    for s, b in zip(s_shapes, bounds, strict=True)])
    out = pl.pallas_call(kernel, grid=(plan.b, plan.h), in_specs=in_specs,
                         out_specs=out_specs, out_shape=out_shape,
                         compiler_params=_triton_params(plan), interpret=interpret,
                         name="chunk_scan_backward_gpu")(*x_in, *bounds, *ct_y, *ct_final)
    return out[len(diff):], out[:len(diff)]


# --------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------

def _kernel_dtype(dtype):
    return jnp.int32 if dtype == jnp.bool_ else dtype


FORWARD = {"mosaic": _mosaic_forward, "triton": _triton_forward}
BACKWARD = {"mosaic": _mosaic_backward, "triton": _triton_backward}


def _outputs(plan: _Plan, y_blocks: list, final: list):
    """(ys, final states) in the caller's shapes and dtypes."""
    ys = [_from_block(y, jax.ShapeDtypeStruct(y.shape[:3] + s.shape, s.dtype))
          for y, s in zip(y_blocks, plan.y_structs, strict=True)]
    final = [f.reshape(f.shape[:2] + s.shape) for f, s in zip(final, plan.s_structs,
                                                               strict=True)]
    return jax.tree.unflatten(plan.y_tree, ys), plan.states(final)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _kernel_scan(step, states, xs, save_every: int, body: str, interpret: bool):
    plan = _Plan(step, states, xs, save_every)
    ys, final, _ = FORWARD[body](plan, [_to_kernel(s, 2) for s in plan.s_leaves],
                                 [_to_kernel(x, 3) for x in plan.x_leaves], save=False,
                                 interpret=interpret)
    return _outputs(plan, ys, final)


def _kernel_scan_fwd(step, states, xs, save_every, body, interpret):
    plan = _Plan(step, states, xs, save_every)
    x_in = [_to_kernel(x, 3) for x in plan.x_leaves]
    ys, final, bounds = FORWARD[body](plan, [_to_kernel(s, 2) for s in plan.s_leaves], x_in,
                                      save=True, interpret=interpret)
    return _outputs(plan, ys, final), (xs, bounds)


def _kernel_scan_bwd(step, save_every, body, interpret, residuals, cotangents):
    xs, bounds = residuals
    ct_ys, ct_final = cotangents
    x_leaves = jax.tree.leaves(xs)
    n, b, h = x_leaves[0].shape[:3]
    states = jax.tree.unflatten(jax.tree.structure(ct_final),
                                [jax.ShapeDtypeStruct((b, h) + c.shape[2:], c.dtype)
                                 for c in jax.tree.leaves(ct_final)])
    plan = _Plan(step, states, xs, save_every)
    total = plan.segments * plan.save_every

    def padded(x):                 # whole segments (the extra chunks are masked)
        x = _to_kernel(x, 3)
        return jnp.pad(x, [(0, total - n)] + [(0, 0)] * (x.ndim - 1)) if total > n else x

    x_in = [padded(x) for x in x_leaves]
    ct_y = [padded(c.astype(s.dtype)) for c, s in zip(jax.tree.leaves(ct_ys), plan.y_structs,
                                                      strict=True)]
    ct_f = [_to_kernel(c, 2) for c in jax.tree.leaves(ct_final)]
    d_init, d_x = BACKWARD[body](plan, x_in, list(bounds), ct_y, ct_f, interpret=interpret)
    d_iter = iter(d_x)
    d_xs = []
    for x, s in zip(x_leaves, plan.x_structs, strict=True):
        if _differentiable(s.dtype):
            d_xs.append(next(d_iter)[:n].reshape(x.shape))
        else:
            d_xs.append(np.zeros(x.shape, jax.dtypes.float0))
    d_init = [d.reshape(d.shape[:2] + s.shape) for d, s in zip(d_init, plan.s_structs,
                                                               strict=True)]
    return plan.states(d_init), jax.tree.unflatten(plan.x_tree, d_xs)


_kernel_scan.defvjp(_kernel_scan_fwd, _kernel_scan_bwd)


def chunk_scan(step, states, xs, *, save_every: int = 1, body: str = "auto",
               interpret: bool | None = None, triton: bool = True):
    """Dispatch: ``(ys, final states)`` of the recurrence over chunks, forward and
    backward in Pallas kernels.

    ``states``: pytree of ``[B, H, ...]`` arrays; ``xs``: pytree of ``[N, B, H, ...]``
    arrays; ``step(state, chunk) -> (state, y)`` on one (batch, head) and chunk
    (module docstring).  ``save_every``: chunks per saved boundary state (the
    backward recomputes the others).  ``body``: ``"auto"`` picks by the
    platform the program is lowered for (Mosaic on a TPU, Triton on a CUDA GPU
    when every per-head dimension is a power of two of at least 16 and the jnp
    ``reference`` otherwise, the Mosaic bodies in interpret mode on the CPU); ``"mosaic"`` or
    ``"triton"`` forces a body (compiled, or interpreted on the CPU);
    ``interpret`` True/False applies everywhere.  ``triton=False`` says that
    ``step`` does not lower through Pallas Triton (e.g. it slices values, which
    Triton's lowering lacks): ``"auto"`` then runs the jnp ``reference`` on a
    CUDA GPU.  Raises ValueError on other backends and for malformed inputs.
    """
    if body not in ("auto", *BODIES):
        raise ValueError(f"chunk_scan: body={body!r}; use 'auto' or one of {BODIES}")
    if interpret is None and jax.default_backend() not in BACKENDS:
        raise ValueError(f"the chunk-scan kernels run on {', '.join(BACKENDS)}, not on "
                         f"{jax.default_backend()}; use the level's chunked path")
    plan = _Plan(step, states, xs, save_every)      # validates shapes now
    if body == "triton" and not triton_shapes_ok(plan):
        shapes = sorted({s.shape for s in plan.s_structs + plan.x_structs + plan.y_structs})
        raise ValueError(f"chunk_scan body='triton' needs per-head dimensions that are "
                         f"powers of two >= 16 (Triton blocks); got {shapes}")

    def kernel(name, interp):
        return functools.partial(_kernel_scan, step, save_every=plan.save_every, body=name,
                                 interpret=interp)

    if body == "auto" and interpret is not None:
        body = "mosaic"
    if body != "auto":
        if interpret is not None:
            return kernel(body, interpret)(states, xs)
        return jax.lax.platform_dependent(states, xs, cpu=kernel(body, True),
                                          default=kernel(body, False))
    cuda = (kernel("triton", False) if triton and triton_shapes_ok(plan)
            else functools.partial(reference, step))
    return jax.lax.platform_dependent(states, xs, cpu=kernel("mosaic", True),
                                      tpu=kernel("mosaic", False), cuda=cuda)
