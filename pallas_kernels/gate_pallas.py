"""The direction gate of ``QKdot_alpha`` as fused Pallas kernels lowered to Triton (``implementation="pallas"``).

Computes what ``gate_jnp.jnp_direction_gate`` computes (the math is in that module's docstring) without its
per-edge [N, K, (L+1) F] arrays in device memory (for the paper's model, 768 floats per edge, four of them in the
XLA form: the edge MLP's last layer, the contractions, their product and, in the backward pass, its cotangent).
One program takes ``block_t`` target atoms with all their K slots, a [block_t K, A] tile of the hidden layer, and
walks the columns (l, f) in chunks of ``block_f``: the chunk of the last layer (a [block_t K, A] x [A, block_f]
product), the chunk of the contractions (elementwise, the target's rows P_n,(l,m) broadcast over its slots) and
their product times the chunk of the output layer ([block_t K, block_f] x [block_f, H]), accumulated in float32.
Only u, Y, P and the weights are read and only g [N, K, H] is written. The forward reads both weight matrices
transposed (made in XLA, 2 x 98k floats for the paper's model): each product then finds its weight chunk with the
contracted axis contiguous, the layout in which Triton's TF32 products on Hopper run fastest (docs/kernel.md §9).

Gradients (``jax.custom_vjp``). The backward kernel takes the same targets per program (its own column chunk and
stages: ``backward_block_f``, ``backward_num_stages``) and, per chunk, the product's cotangent
ct W_gate^T: it accumulates du = (ct W_gate^T * t) W_mix^T and dY, and writes dP of the chunk's columns (a
program owns its targets, so every dP entry is written once; no atomics). The weights' cotangents are formed in
XLA from the same factors; where they are not needed (forces, molecular dynamics) XLA drops them. The backward
kernel's own derivative (force matching: reverse over reverse) is the jnp twin's second-order derivative.

Tiles. A slot axis K and every width (A, F, H) are padded to powers of two in registers only (masked loads and
stores); Triton's matrix products need every dimension >= 16, so a padded width is at least 16. Float64 inputs
take the jnp twin (``api.direction_gate``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gate_jnp import jnp_direction_gate, lax_precision
from pallas_kernels.triton_launch import Launch, arange, pow2, reject_forward_mode

MIN_DOT = 16  # Triton's matrix products need every dimension >= 16


def _width(n: int) -> int:
  """A register width for n columns: the next power of two, at least ``MIN_DOT``."""
  return max(MIN_DOT, pow2(n))


@dataclasses.dataclass(frozen=True)
class GateTiles:
  """Static tiling of the gate kernels (hashable: a ``nondiff_argnums`` argument).

  Attributes:
    block_t: target atoms per program (block_t * padded K rows per tile), both kernels.
    block_f: columns (l, f) per step of the forward's walk over a degree's F channels.
    backward_block_f: the same for the backward kernel.
    precision: matmul precision of the two products ("highest", "tensorfloat32", "bfloat16").
    launch: the forward kernel's Triton launch parameters and interpret mode.
    backward_launch: the backward kernel's.
  """

  block_t: int
  block_f: int
  backward_block_f: int
  precision: str
  launch: Launch
  backward_launch: Launch


def _dot(x, w, precision: str, transpose_w: bool = False):
  """x [R, I] times w [I, O] (or w [O, I] transposed) in float32 at the tiles' precision."""
  if precision == "bfloat16":
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  contract = ((1,), (1,)) if transpose_w else ((1,), (0,))
  return lax.dot_general(
    x, w, (contract, ((), ())), precision=lax_precision(precision), preferred_element_type=jnp.float32
  )


class _Tile:
  """Indices, masks and loads shared by the forward and backward kernels of one program."""

  def __init__(self, num_n: int, num_k: int, block_t: int):
    self.n, self.n_ok = arange(pl.program_id(0) * block_t, block_t, num_n)
    self.k, k_ok = arange(0, pow2(num_k), num_k)
    self.rows_ok = self.n_ok[:, None] & k_ok[None, :]  # [T, Kp]
    self.shape = (block_t, pow2(num_k))

  def load_rows(self, ref, width: int, limit: int):
    """ref [N, K, limit] -> [T * Kp, width] (zero outside the tile)."""
    c, c_ok = arange(0, width, limit)
    x = pltriton.load(
      ref.at[self.n[:, None, None], self.k[None, :, None], c[None, None, :]],
      mask=self.rows_ok[:, :, None] & c_ok[None, None, :],
      other=0.0,
    )
    return x.astype(jnp.float32).reshape(self.shape[0] * self.shape[1], width)

  def store_rows(self, ref, x, limit: int):
    """Stores x [T * Kp, width] into ref [N, K, limit]."""
    c, c_ok = arange(0, x.shape[-1], limit)
    pltriton.store(
      ref.at[self.n[:, None, None], self.k[None, :, None], c[None, None, :]],
      x.reshape(*self.shape, x.shape[-1]).astype(ref.dtype),
      mask=self.rows_ok[:, :, None] & c_ok[None, None, :],
    )

  def load_harmonic(self, sh_ref, lm: int):
    """Y_(l,m) of the tile's slots, [T, Kp]."""
    return pltriton.load(sh_ref.at[self.n[:, None], self.k[None, :], lm], mask=self.rows_ok, other=0.0).astype(
      jnp.float32
    )

  def load_projected(self, proj_ref, lm: int, f, f_ok):
    """P_n,(l,m),f of the tile's targets for channels f, [T, len(f)]."""
    return pltriton.load(
      proj_ref.at[self.n[:, None], lm, f[None, :]], mask=self.n_ok[:, None] & f_ok[None, :], other=0.0
    ).astype(jnp.float32)


class _ChunkWalk:
  """What both kernels hold for their tile (the rows of u, the slots' harmonics) and the factors of one chunk of
  columns (l, f), which both compute the same way."""

  def __init__(
    self, tiles: GateTiles, u_ref, sh_ref, proj_ref, w_mix_ref, b_mix_ref, w_gate_ref, *, block_f: int, k_major: bool
  ):
    num_n, num_k, self.num_a = u_ref.shape
    num_s, self.num_f = proj_ref.shape[1:]
    self.k_major = k_major
    self.num_h = w_gate_ref.shape[0 if k_major else 1]
    self.width_a, self.width_h = _width(self.num_a), _width(self.num_h)
    self.tiles, self.block_f, self.refs = tiles, block_f, (proj_ref, w_mix_ref, b_mix_ref, w_gate_ref)
    self.tile = _Tile(num_n, num_k, tiles.block_t)
    self.u = self.tile.load_rows(u_ref, self.width_a, self.num_a)
    self.harmonics = [self.tile.load_harmonic(sh_ref, lm) for lm in range(num_s)]
    self.degrees = range(math.isqrt(num_s))
    self.num_chunks = pl.cdiv(self.num_f, block_f)

  def factors(self, l: int, c):
    """Chunk c of degree l: its channels f and their mask, the chunk's W_mix columns and W_gate rows ([Ap, block_f]
    and [block_f, Hp]; transposed with ``k_major``), m = u W_mix + b_mix [T Kp, block_f], the target's P rows
    [T, block_f] per m, and t [T, Kp, block_f]."""
    proj_ref, w_mix_ref, b_mix_ref, w_gate_ref = self.refs
    f, f_ok = arange(c * self.block_f, self.block_f, self.num_f)
    col = l * self.num_f + f
    a, a_ok = arange(0, self.width_a, self.num_a)
    h, h_ok = arange(0, self.width_h, self.num_h)
    if self.k_major:  # W_mix^T [(L+1) F, A] and W_gate^T [H, (L+1) F]: chunks [block_f, Ap] and [Hp, block_f]
      w_mix = pltriton.load(w_mix_ref.at[col[:, None], a[None, :]], mask=f_ok[:, None] & a_ok[None, :], other=0.0)
      w_gate = pltriton.load(w_gate_ref.at[h[:, None], col[None, :]], mask=h_ok[:, None] & f_ok[None, :], other=0.0)
    else:  # W_mix [A, (L+1) F] and W_gate [(L+1) F, H]: chunks [Ap, block_f] and [block_f, Hp]
      w_mix = pltriton.load(w_mix_ref.at[a[:, None], col[None, :]], mask=a_ok[:, None] & f_ok[None, :], other=0.0)
      w_gate = pltriton.load(w_gate_ref.at[col[:, None], h[None, :]], mask=f_ok[:, None] & h_ok[None, :], other=0.0)
    b_mix = pltriton.load(b_mix_ref.at[col], mask=f_ok, other=0.0)
    w_mix, w_gate = w_mix.astype(jnp.float32), w_gate.astype(jnp.float32)
    mixed = _dot(self.u, w_mix, self.tiles.precision, self.k_major) + b_mix.astype(jnp.float32)[None, :]
    projected = [self.tile.load_projected(proj_ref, lm, f, f_ok) for lm in range(l * l, (l + 1) ** 2)]
    t = sum(self.harmonics[l * l + m][:, :, None] * p[:, None, :] for m, p in enumerate(projected))
    return f, f_ok, w_mix, w_gate, mixed, projected, t


def _gate_forward_kernel(u_ref, sh_ref, proj_ref, w_mix_t_ref, b_mix_ref, w_gate_t_ref, b_gate_ref, g_ref, *, tiles):
  """g [N, K, H] for the program's ``block_t`` targets (refs as ``jnp_direction_gate``'s arguments, the two weight
  matrices transposed: both products then read their weight chunks with the contracted axis contiguous, which
  Triton's TF32 products on Hopper run up to 1.5x faster, docs/kernel.md §9)."""
  walk = _ChunkWalk(
    tiles, u_ref, sh_ref, proj_ref, w_mix_t_ref, b_mix_ref, w_gate_t_ref, block_f=tiles.block_f, k_major=True
  )
  acc = jnp.zeros((walk.u.shape[0], walk.width_h), jnp.float32)
  for l in walk.degrees:

    def chunk(c, acc, l=l):
      _, _, _, w_gate, mixed, _, t = walk.factors(l, c)
      return acc + _dot(t.reshape(mixed.shape) * mixed, w_gate, tiles.precision, transpose_w=True)

    acc = lax.fori_loop(0, walk.num_chunks, chunk, acc)
  h, h_ok = arange(0, walk.width_h, walk.num_h)
  walk.tile.store_rows(g_ref, acc + pltriton.load(b_gate_ref.at[h], mask=h_ok, other=0.0)[None, :], walk.num_h)


def _gate_backward_kernel(
  u_ref, sh_ref, proj_ref, w_mix_ref, b_mix_ref, w_gate_ref, ct_ref, du_ref, dsh_ref, dproj_ref, *, tiles
):
  """du [N, K, A], dY [N, K, S] and dP [N, S, F] from the cotangent ct [N, K, H] of g."""
  walk = _ChunkWalk(
    tiles, u_ref, sh_ref, proj_ref, w_mix_ref, b_mix_ref, w_gate_ref, block_f=tiles.backward_block_f, k_major=False
  )
  tile = walk.tile
  ct = tile.load_rows(ct_ref, walk.width_h, walk.num_h)
  du = jnp.zeros_like(walk.u)
  d_harmonics = []
  for l in walk.degrees:
    degree = range(l * l, (l + 1) ** 2)

    def chunk(c, carry, l=l, degree=degree):
      du, d_sh = carry
      f, f_ok, w_mix, w_gate, mixed, projected, t = walk.factors(l, c)
      d_product = _dot(ct, w_gate, tiles.precision, transpose_w=True)  # [T Kp, block_f]
      du = du + _dot(d_product * t.reshape(mixed.shape), w_mix, tiles.precision, transpose_w=True)
      d_t = (d_product * mixed).reshape(t.shape)  # [T, Kp, block_f]
      for lm in degree:
        pltriton.store(
          dproj_ref.at[tile.n[:, None], lm, f[None, :]],
          jnp.sum(d_t * walk.harmonics[lm][:, :, None], axis=1).astype(dproj_ref.dtype),
          mask=tile.n_ok[:, None] & f_ok[None, :],
        )
      d_sh = tuple(d + jnp.sum(d_t * p[:, None, :], axis=2) for d, p in zip(d_sh, projected))
      return du, d_sh

    zeros = tuple(jnp.zeros(tile.shape, jnp.float32) for _ in degree)
    du, d_sh = lax.fori_loop(0, walk.num_chunks, chunk, (du, zeros))
    d_harmonics.extend(d_sh)
  tile.store_rows(du_ref, du, walk.num_a)
  for lm, d in enumerate(d_harmonics):
    pltriton.store(dsh_ref.at[tile.n[:, None], tile.k[None, :], lm], d.astype(dsh_ref.dtype), mask=tile.rows_ok)


def _grid(tiles: GateTiles, num_n: int):
  return (pl.cdiv(num_n, tiles.block_t),)


def _forward(tiles: GateTiles, u, sh, proj, w_mix, b_mix, w_gate, b_gate):
  num_n, num_k = u.shape[:2]
  out = jax.ShapeDtypeStruct((num_n, num_k, w_gate.shape[1]), u.dtype)
  kernel = functools.partial(_gate_forward_kernel, tiles=tiles)
  return tiles.launch.call(kernel, out, _grid(tiles, num_n))(u, sh, proj, w_mix.T, b_mix, w_gate.T, b_gate)


def _input_cotangents_kernel(tiles: GateTiles, u, sh, proj, w_mix, b_mix, w_gate, ct):
  outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (u, sh, proj)]
  kernel = functools.partial(_gate_backward_kernel, tiles=tiles)
  call = tiles.backward_launch.call(kernel, outs, _grid(tiles, u.shape[0]))
  return tuple(call(u, sh, proj, w_mix, b_mix, w_gate, ct))


def _twin_cotangents(precision: str, u, sh, proj, w_mix, b_mix, w_gate, b_gate, ct):
  """The jnp twin's cotangents of all seven inputs for the cotangent ct of g (differentiable to any order)."""
  inputs = (u, sh, proj, w_mix, b_mix, w_gate, b_gate)
  _, pullback = jax.vjp(functools.partial(jnp_direction_gate, precision=precision), *inputs)
  return pullback(ct)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _input_cotangents(tiles: GateTiles, u, sh, proj, w_mix, b_mix, w_gate, ct):
  """(du, dY, dP) = the cotangents of (u, Y, P) for the cotangent ct [N, K, H] of g, by the backward kernel."""
  return _input_cotangents_kernel(tiles, u, sh, proj, w_mix, b_mix, w_gate, ct)


def _input_cotangents_fwd(tiles, *args):
  reject_forward_mode(*args)
  return _input_cotangents(tiles, *args), args


def _input_cotangents_bwd(tiles, args, cts):
  def twin(u, sh, proj, w_mix, b_mix, w_gate, ct):  # the cotangents of u, Y and P do not depend on b_gate
    b_gate = jnp.zeros((w_gate.shape[1],), w_gate.dtype)
    return _twin_cotangents(tiles.precision, u, sh, proj, w_mix, b_mix, w_gate, b_gate, ct)[:3]

  _, pullback = jax.vjp(twin, *args)
  return pullback(cts)


_input_cotangents.defvjp(_input_cotangents_fwd, _input_cotangents_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _direction_gate(tiles: GateTiles, u, sh, proj, w_mix, b_mix, w_gate, b_gate):
  return _forward(tiles, u, sh, proj, w_mix, b_mix, w_gate, b_gate)


def _direction_gate_fwd(tiles, *args):
  reject_forward_mode(*args)
  # Calling the custom_vjp function (not the kernel) keeps an outer reverse pass on these rules.
  return _direction_gate(tiles, *args), args


def _direction_gate_bwd(tiles, args, ct):
  du, dsh, dproj = _input_cotangents(tiles, *args[:-1], ct)
  # The weights' cotangents in XLA, by the twin: dropped from programs that do not read them (forces).
  weight_cts = _twin_cotangents(tiles.precision, *args, ct)[3:]
  return du, dsh, dproj, *weight_cts


_direction_gate.defvjp(_direction_gate_fwd, _direction_gate_bwd)


def pallas_direction_gate(
  u,
  sh,
  proj,
  w_mix,
  b_mix,
  w_gate,
  b_gate,
  *,
  precision: str = "highest",
  interpret: bool | None = None,
  block_t: int = 4,
  block_f: int = 64,
  num_warps: int = 8,
  num_stages: int = 2,
  backward_block_f: int = 32,
  backward_num_stages: int = 1,
):
  """Fused direction gate; same math, arguments and result as ``gate_jnp.jnp_direction_gate``.

  Args:
    u, sh, proj, w_mix, b_mix, w_gate, b_gate: as ``jnp_direction_gate`` (float32).
    precision: matmul precision of the two products; the contractions and accumulations are float32.
    interpret: run the kernels in Pallas interpret mode; None = when the default backend is not a GPU.
    block_t: target atoms per program of both kernels (a power of two).
    block_f: columns per step of the forward's walk over each degree's channels (a power of two, >= 16).
    num_warps: Triton's warps per program, both kernels.
    num_stages: Triton's pipelining stages of the forward kernel.
    backward_block_f, backward_num_stages: block_f and num_stages of the backward kernel.
    The defaults are the fastest tilings measured (benchmarks/gate.py, H100, TF32, 4,096 atoms, 2026-12-07).

  Returns:
    g [N, K, H]. Differentiable in reverse mode to any order (``jax.custom_vjp``); forward mode raises a
    TypeError.
  """
  num_n, num_k, num_a = u.shape
  num_s, num_f = proj.shape[1:]
  if sh.shape != (num_n, num_k, num_s) or proj.shape[0] != num_n or math.isqrt(num_s) ** 2 != num_s:
    raise ValueError(f"sh must be [N, K, (L+1)^2] and proj [N, (L+1)^2, F]; got {sh.shape} and {proj.shape}")
  columns = math.isqrt(num_s) * num_f
  if w_mix.shape != (num_a, columns) or b_mix.shape != (columns,) or w_gate.shape[0] != columns:
    raise ValueError(
      f"w_mix must be [A, (L+1) F] = {(num_a, columns)}, b_mix [(L+1) F] and w_gate [(L+1) F, H]; got "
      f"{w_mix.shape}, {b_mix.shape}, {w_gate.shape}"
    )
  if b_gate.shape != w_gate.shape[1:]:
    raise ValueError(f"b_gate must be [H] = {w_gate.shape[1:]}, got {b_gate.shape}")
  if block_t < 1 or block_t & (block_t - 1) or any(f < MIN_DOT or f & (f - 1) for f in (block_f, backward_block_f)):
    raise ValueError(
      f"block_t must be a power of two and block_f, backward_block_f powers of two >= 16, got {block_t}, "
      f"{block_f}, {backward_block_f}"
    )
  reject_forward_mode(u, sh, proj, w_mix, b_mix, w_gate, b_gate)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tiles = GateTiles(
    block_t,
    block_f,
    backward_block_f,
    precision,
    Launch(bool(interpret), num_warps, num_stages),
    Launch(bool(interpret), num_warps, backward_num_stages),
  )
  return _direction_gate(tiles, u, sh, proj, w_mix, b_mix, w_gate, b_gate)
