"""The analytic model FLOPs (``nl_jax/models/flops.py``) against what XLA compiles.

Each check compiles a forward pass of a small config with every ``lax.scan``
unrolled (XLA's cost analysis counts a while-loop body once) and compares the
analytic forward FLOPs per token with (a) the matrix products in the compiled
HLO (``2 m k n`` per ``dot``), within ``DOT_TOLERANCE``, and (b) XLA's
``cost_analysis()['flops']``, which also counts the elementwise work, so it must
lie between the analytic count and a loose multiple of it.  The compared parts
are each a whole model or layer, so a missing term of more than
``DOT_TOLERANCE`` of it fails (the smallest checked here: the LM head, the
Titans memory, Hope's adaptive-memory update; the main memory's end-of-chunk
update is ~3% of the Hope mixer at this size, below it).

What XLA does beyond the analytic convention, and why the tolerance is not 0:
attention and the sliding window multiply the masked half of their diagonal
blocks; the DGD solve is a block-doubling inverse (~C^3 / 3 multiply-adds) and
a product, not a substitution; the linear memory's gate prefix sums are GEMMs
with a triangular 0/1 matrix; the first chunk's products with the all-zero
initial momentum (and linear memory) are folded away.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nl_jax import config as config_lib
from nl_jax.errors import ConfigError
from nl_jax.models import attention, flops, lm
from nl_jax.train.state import abstract_model

DOT_TOLERANCE = 0.06
ELEMENTWISE_ALLOWANCE = 1.5      # cost_analysis flops <= this x the analytic matmuls
SMALL = {"model.n_layers": "1", "model.vocab_size": "512", "model.d_model": "64",
         "model.d_ff": "256"}

_SHAPE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]")


def hlo_dot_flops(hlo_text: str) -> float:
    """``2 * |output| * |contracted|`` summed over the ``dot`` ops of an HLO module
    (names looked up within each computation; operands come before their users)."""
    shapes, total = {}, 0.0
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            shapes = {}                              # a new computation
        m = _SHAPE.match(line)
        if not m:
            continue
        shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
        if " dot(" in line:
            lhs = re.search(r" dot\(([^,)]*)", line).group(1).split()[-1].lstrip("%")
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
            contracted = math.prod(shapes[lhs][int(i)] for i in dims.split(",") if i)
            total += 2.0 * math.prod(shapes[m.group(1)]) * contracted
    return total


@pytest.fixture
def unrolled_scans(monkeypatch):
    """Every ``jax.lax.scan`` of the models fully unrolled while a test runs."""
    scan = jax.lax.scan

    def unrolled(f, init, xs=None, length=None, **kwargs):
        return scan(f, init, xs, length, **dict(kwargs, unroll=True))

    monkeypatch.setattr(jax.lax, "scan", unrolled)


def small_config(path: str, **overrides):
    config = config_lib.load_config_file(path)
    return config_lib.apply_overrides(config, [*SMALL.items(), *overrides.items()])


def compiled_flops_per_token(fn, *args, tokens: int) -> tuple[float, float]:
    """(dot FLOPs, cost-analysis FLOPs) per token of ``jax.jit(fn)(*args)``."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return hlo_dot_flops(compiled.as_text()) / tokens, cost["flops"] / tokens


def model_xla_flops(config) -> tuple[float, float]:
    """XLA's FLOPs per token of the whole model's forward (logits), batch 1."""
    model_def, params = abstract_model(config.model)
    tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
    return compiled_flops_per_token(lambda p, x: model_def.bind(p)(x)[0], params, tokens,
                                    tokens=config.data.seq_len)


def part_xla_flops(config, key: str) -> tuple[float, float]:
    """XLA's FLOPs per token of one layer's ``model.mixer`` or ``model.mlp``, batch 1."""
    table = {"mixer": lm.MIXERS, "mlp": lm.MLPS}[key]
    cls = lm._resolve(table, key, config.model[key])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config.model, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, config.data.seq_len, config.model.d_model), jnp.float32)
    return compiled_flops_per_token(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, x,
                                    tokens=config.data.seq_len)


def assert_matches_xla(analytic: float, dots: float, cost: float):
    """``analytic`` within the tolerance of XLA's products, and below its total."""
    assert abs(dots / analytic - 1) <= DOT_TOLERANCE, (analytic, dots)
    assert 0.97 * analytic <= cost <= ELEMENTWISE_ALLOWANCE * analytic, (analytic, cost)


def test_transformer_matches_xla(unrolled_scans, monkeypatch):
    """The whole Transformer++ (4 query blocks of 16: the blocked attention)."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    config = small_config("experiments/transformer/tiny.py", **{"data.seq_len": "64"})
    parts = flops.forward_flops_breakdown(config)
    dots, cost = model_xla_flops(config)
    total = flops.forward_flops_per_token(config)
    assert_matches_xla(total, dots, cost)
    for part in parts.values():           # dropping any part would fail the check
        assert part > DOT_TOLERANCE * 1.5 * total


def test_titans_mag_mixer_matches_xla(unrolled_scans):
    """Titans MAG: sliding-window attention + the chunked linear memory, 4 chunks
    in one remat block, 2 heads of 32 (the memory is ~1/4 of the mixer)."""
    config = small_config("experiments/titans/tiny.py", **{
        "model.mixer": "titans_mag", "model.n_heads": "2", "data.seq_len": "64",
        "model.memory.window": "8", "model.memory.remat_every": "4"})
    analytic = flops.titans_mag_flops(config.model, 64)
    dots, cost = part_xla_flops(config, "mixer")
    assert_matches_xla(analytic, dots, cost)
    spec = flops.titans_parts(config.model)[0]
    memory = 2 * flops.chunked(64, 16, *flops.titans_memory_chunk(spec, 16, 32)) / 64
    assert memory > 2 * DOT_TOLERANCE * analytic      # a miss in the memory would show


@pytest.mark.parametrize("part", ["mixer", "mlp"])
def test_hope_matches_xla(unrolled_scans, part):
    """Hope: the self-modifying mixer (2 chunks of the adaptive memories, 2 of the
    main memory: both carry and output work) and the CMS (an in-context level
    updated once in the sequence, and a frozen one)."""
    config = small_config("experiments/hope/tiny.py", **{
        "data.seq_len": "32", "model.self_modifying.chunk_size": "16",
        "model.self_modifying.memory_chunk_size": "16", "model.cms.periods": "16,never"})
    count = flops.self_modifying_flops if part == "mixer" else flops.cms_flops
    analytic = count(config.model, 32)
    dots, cost = part_xla_flops(config, part)
    assert_matches_xla(analytic, dots, cost)


@pytest.mark.parametrize("mixer", ["mamba2", "gated_deltanet"])
def test_baselines_match_xla(unrolled_scans, mixer):
    """The baselines' mixers (presets of Hope's): 2 chunks of 16, read after the
    write, no self-generated values, the output gate (Gated DeltaNet)."""
    config = small_config(f"experiments/baselines/{mixer}.py", **{
        "data.seq_len": "32", "model.self_modifying.memory_chunk_size": "16"})
    analytic = flops.self_modifying_flops(config.model, 32)
    dots, cost = part_xla_flops(config, "mixer")
    assert_matches_xla(analytic, dots, cost)


def test_hlo_dot_flops_counts_a_known_program():
    def f(a, b, c):
        return jnp.tanh(a @ b) @ c, jnp.einsum("hij,hjk->hik", c[None].repeat(3, 0),
                                               b[None].repeat(3, 0))

    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((8, 16), (16, 4), (4, 16))]
    dots, cost = compiled_flops_per_token(f, *shapes, tokens=1)
    assert dots == 2 * (8 * 16 * 4 + 8 * 4 * 16 + 3 * 4 * 16 * 4)
    assert cost >= dots


def test_in_context_updates_are_counted_where_a_later_token_reads_them():
    config = small_config("experiments/hope/tiny.py", **{"model.cms.periods": "16,never"})
    m = config.model
    frozen = 6 * m.d_model * m.d_ff
    update = 8 * m.d_model * m.d_ff + 2 * m.d_model
    assert flops.cms_flops(m, 16) == pytest.approx(2 * frozen)          # never fires
    assert flops.cms_flops(m, 64) == pytest.approx(2 * frozen + update * 48 / 64)
    hope = [flops.self_modifying_flops(m, t) for t in (32, 64, 128)]
    assert hope[0] < hope[1] < hope[2]       # more chunks whose update is read


def test_titans_linear_memory_count_is_bench_memorys():
    """Per chunk, output + carry work = ``bench memory``'s count of the same path."""
    from nl_jax.bench.memory import chunked_flops
    from nl_jax.memory import MemorySpec
    spec = MemorySpec(kind="linear", objective="l2", momentum=True, chunk_size=64)
    output, carry = flops.titans_memory_chunk(spec, 64, 32)
    assert output + carry == chunked_flops(64, 64, 32, b=1, h=1)


@pytest.mark.parametrize("t, window", [(10, 0), (10, 3), (10, 10), (10, 40), (1, 0)])
def test_visible_keys_counts_the_unmasked_pairs(t, window):
    pairs = sum(1 for i in range(t) for j in range(t)
                if j <= i and (window == 0 or j > i - window))
    assert flops.visible_keys(t, window) == pairs


def test_training_is_three_forwards_and_depends_on_length():
    config = small_config("experiments/transformer/tiny.py")
    forward = flops.forward_flops_per_token(config)
    assert flops.model_flops_per_token(config) == pytest.approx(3 * forward)
    assert flops.model_flops_per_token(config, seq_len=1024) > 3 * forward  # attention


def test_every_mixer_and_mlp_has_a_count():
    assert set(flops.MIXER_FLOPS) == set(lm.MIXERS)
    assert set(flops.MLP_FLOPS) == set(lm.MLPS)
    for mixer in ("titans_lmm", "titans_mac", "titans_mal"):
        config = small_config("experiments/titans/tiny.py", **{"model.mixer": mixer})
        assert flops.model_flops_per_token(config) > 0


@pytest.mark.parametrize("key, value", [("model.mixer", "mamba"), ("model.mlp", "moe")])
def test_unknown_mixer_or_mlp_names_the_key(key, value):
    config = small_config("experiments/transformer/tiny.py", **{key: value})
    with pytest.raises(ConfigError, match=f"{key}='{value}'"):
        flops.model_flops_per_token(config)
