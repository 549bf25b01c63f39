"""``lopd_jax.plan.collectives``: per-step collective bytes from compiled HLO text, on modules whose bytes are known."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lopd_jax.plan import collectives


def test_shape_bytes():
    assert collectives.shape_bytes("f32[8,16]{1,0}") == 512
    assert collectives.shape_bytes("(bf16[4]{0}, s32[2,3]{1,0})") == 8 + 24
    assert collectives.shape_bytes("pred[]") == 1 and collectives.shape_bytes("f8e4m3fn[10]") == 10


def test_compiled_loop_counts_each_iteration():
    """A 5-step scan on 8 devices whose body psums a f32[1000] carry (all-reduce: 4,000 B), all-gathers a
    f32[125] slice to f32[1000] (all-gather: 4,000 B) and all-to-alls a f32[8, 16] block (512 B); XLA:CPU's
    compiled module must count 5x each, with the loop's trip count known."""
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("i",))

    def body(carry, _):
        total = jax.lax.psum(carry, "i")
        gathered = jax.lax.all_gather(total[:125], "i", tiled=True)
        swapped = jax.lax.all_to_all(total[:128].reshape(8, 16), "i", 0, 0, tiled=True)
        return carry + gathered + jnp.sum(swapped), None

    def per_device(x):
        return jax.lax.scan(body, x, None, length=5)[0]

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    text = f.lower(jnp.ones(1000, jnp.float32)).compile().as_text()
    got = collectives.collective_bytes(text)
    assert got.unknown_trip_counts == 0
    assert got.by_kind["all-reduce"] == 5 * 4000
    assert got.by_kind["all-gather"] == 5 * 4000
    assert got.by_kind["all-to-all"] == 5 * 512
    assert got.total == 5 * (4000 + 4000 + 512)


# A hand-written module in XLA:GPU's forms: async all-gather / reduce-scatter starts (their tuple results carry the
# operands), a reduce-scatter inside an async wrapper computation, a ragged all-to-all (input 100 rows, output
# buffer 800 rows), and a while loop (trip count 48) nested in another (trip count 4).
GPU_STYLE = """HloModule m

%wrapped_rs (p: f32[64]) -> f32[8] {
  %p = f32[64]{0} parameter(0)
  ROOT %reduce-scatter.1 = f32[8]{0} reduce-scatter(%p), replica_groups={}, dimensions={0}, to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (t: (s32[], bf16[16,8])) -> (s32[], bf16[16,8]) {
  %t = (s32[], bf16[16,8]{1,0}) parameter(0)
  %x = bf16[2,8]{1,0} get-tuple-element(%t), index=1
  %ag = (bf16[2,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = bf16[16,8]{1,0} all-gather-done(%ag)
  %big = f32[64]{0} constant({...})
  %rs-start = ((f32[64]{0}), f32[8]{0}) async-start(%big), calls=%wrapped_rs
  %rs-done = f32[8]{0} async-done(%rs-start)
  %in = bf16[100,8]{1,0} constant({...})
  %out = bf16[800,8]{1,0} constant({...})
  %o = s64[8]{0} constant({...})
  %r = bf16[800,8]{1,0} ragged-all-to-all(%in, %out, %o, %o, %o, %o), replica_groups={}
  ROOT %tt = (s32[], bf16[16,8]{1,0}) tuple(%i, %agd)
}

%inner_cond (t: (s32[], bf16[16,8])) -> pred[] {
  %t = (s32[], bf16[16,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%count_cond (t: (s32[], bf16[16,8])) -> pred[] {
  %t = (s32[], bf16[16,8]{1,0}) parameter(0)
  %n = s32[]{:T(128)} constant(4)
  %i = s32[]{:T(128)} get-tuple-element(%t), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%outer_body (t: (s32[], bf16[16,8])) -> (s32[], bf16[16,8]) {
  %t = (s32[], bf16[16,8]{1,0}) parameter(0)
  ROOT %w = (s32[], bf16[16,8]{1,0}) while(%t), condition=%inner_cond, body=%inner_body, INNER_TRIPS
  %ar = f32[10]{0} all-reduce-start(%v), to_apply=%add
  %ard = f32[10]{0} all-reduce-done(%ar)
}

ENTRY %main (a: (s32[], bf16[16,8])) -> (s32[], bf16[16,8]) {
  %a = (s32[], bf16[16,8]{1,0}) parameter(0)
  %v = f32[10]{0} constant({...})
  ROOT %w2 = (s32[], bf16[16,8]{1,0}) while(%a), ENTRY_LOOP
}
"""
ENTRY_LOOP = 'condition=%inner_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"4"}}'
GPU_STYLE = GPU_STYLE.replace("INNER_TRIPS", 'backend_config={"known_trip_count":{"n":"48"}}')
GPU_STYLE = GPU_STYLE.replace("ENTRY_LOOP", ENTRY_LOOP)


def test_gpu_forms_async_wrappers_ragged_and_nested_loops():
    got = collectives.collective_bytes(GPU_STYLE)
    inner, outer = 48 * 4, 4
    assert got.by_kind["all-gather"] == inner * 16 * 8 * 2  # the gathered bf16[16, 8], not the start's tuple
    assert got.by_kind["reduce-scatter"] == inner * 64 * 4  # the f32[64] input, counted inside its wrapper
    assert got.by_kind["ragged-all-to-all"] == inner * 100 * 8 * 2  # the smaller buffer: the 100-row input
    assert got.by_kind["all-reduce"] == outer * 10 * 4  # -done is not counted again
    assert got.by_kind["all-to-all"] == 0 and got.unknown_trip_counts == 0


def test_trip_count_from_the_loop_condition():
    """XLA:TPU's compiled text has no known_trip_count: a jax loop's ``counter < N`` condition gives it."""
    text = GPU_STYLE.replace(ENTRY_LOOP, "condition=%count_cond, body=%outer_body")
    assert text != GPU_STYLE
    assert collectives.collective_bytes(text) == collectives.collective_bytes(GPU_STYLE)


def test_loop_without_trip_count_is_reported():
    text = GPU_STYLE.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    assert text != GPU_STYLE
    got = collectives.collective_bytes(text)
    assert got.unknown_trip_counts == 1 and got.by_kind["all-reduce"] == 10 * 4
