"""The radial profile of the edges as a fused Pallas kernel lowered to Triton (``implementation="pallas"``).

Computes what ``radial_jnp.jnp_radial_profile`` computes (the math is in that module's docstring) with only the
result in device memory. In XLA the MLP crosses device memory several times per layer: the radial basis [N, K, B]
(B = 256 for the paper's models), the first layer's sum with the gathered type rows, each LayerNorm's and SiLU's
input and output, each product's output, all [N, K, A] with A = 128. One program here takes ``block_r``
consecutive slots (rows of the flat [N K] slot axis): it loads each slot's distance, its target's row and its
source element's row, forms the radial basis in chunks of ``block_b`` functions and multiplies each chunk by its
rows of W_rbf as it goes, then applies the norms, SiLUs and Linears in registers and writes [block_r, O].

Gradients (``jax.custom_vjp``). Under differentiation a second kernel runs in the forward pass: the same walk
carrying, beside every layer's x, its derivative with respect to the slot's distance (forward mode in registers:
the basis functions' derivatives times W_rbf, then each norm's, SiLU's and Linear's tangent map), and it writes the
result and t = d out / d distance [N, K, O]. The backward pass is then d distance = sum_o ct_o t_o, one XLA
reduction; forces need nothing else, since the type rows and every weight depend on the parameters alone. Their
cotangents are the jnp twin's, in XLA, and are dropped from programs that do not read them (energies and forces,
molecular dynamics). The kernel pair's own derivative (force matching: reverse over reverse) is the twin's: the
VJP of (twin, its distance tangent). The tangent kernel does twice the forward's products, against the twin's
forward and backward in XLA that cross device memory with the basis and every hidden layer (docs/kernel.md §8).

Tiles. Every width is padded to a power of two (at least 16, Triton's smallest product) in registers only
(masked loads and stores; the padded columns stay exactly zero through every layer, so the norms' sums run over
the real columns). Float64 inputs take the jnp twin (``api.radial_profile``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gate_pallas import _dot, _width
from pallas_kernels.radial_jnp import (
  LAYER_NORM_EPSILON,
  basis_centers,
  basis_sigma,
  check_layers,
  jnp_radial_profile,
)
from pallas_kernels.triton_launch import Launch, arange, reject_forward_mode


@dataclasses.dataclass(frozen=True)
class RadialTiles:
  """Static setting of the radial-profile kernels (hashable: a ``nondiff_argnums`` argument).

  Attributes:
    block_r: slots per program.
    block_b: radial basis functions per step of the first layer's walk.
    basis: (cutoff, num_basis, width) of the radial basis.
    precision: matmul precision of the products ("highest", "tensorfloat32", "bfloat16").
    launch: Triton launch parameters and interpret mode.
    tangent_block_r: slots per program of the kernel that also writes the distance tangent.
    tangent_launch: that kernel's launch parameters.
  """

  block_r: int
  block_b: int
  basis: tuple[float, int, float]
  precision: str
  launch: Launch
  tangent_block_r: int
  tangent_launch: Launch


def _load_matrix(ref, num_rows_padded: int, num_cols_padded: int):
  """A whole [O, I] weight (a Linear's transposed), padded with zeros to [Op, Ip], as float32."""
  o, o_ok = arange(0, num_rows_padded, ref.shape[0])
  i, i_ok = arange(0, num_cols_padded, ref.shape[1])
  w = pltriton.load(ref.at[o[:, None], i[None, :]], mask=o_ok[:, None] & i_ok[None, :], other=0.0)
  return w.astype(jnp.float32)


def _load_vector(ref, num_padded: int):
  """A whole [O] vector, padded with zeros to [Op], as float32."""
  o, o_ok = arange(0, num_padded, ref.shape[0])
  return pltriton.load(ref.at[o], mask=o_ok, other=0.0).astype(jnp.float32)


def _sigmoid(y):
  return 1.0 / (1.0 + jnp.exp(-y))


class _Program:
  """The slots of one program: their distances, and the radial basis and first layer formed from them."""

  def __init__(
    self, tiles: RadialTiles, block_r: int, num_k: int, dist_ref, target_ref, source_ref, numbers_ref, centers_ref
  ):
    self.tiles, self.num_k = tiles, num_k
    self.num_r = dist_ref.shape[0]
    self.r, self.r_ok = arange(pl.program_id(0) * block_r, block_r, self.num_r)
    self.distance = pltriton.load(dist_ref.at[self.r], mask=self.r_ok, other=1.0).astype(jnp.float32)
    self.target_ref, self.source_ref = target_ref, source_ref
    self.numbers_ref, self.centers_ref = numbers_ref, centers_ref
    cutoff, num_basis, width = tiles.basis
    self.num_b, self.sigma2 = num_basis, basis_sigma(cutoff, num_basis, width) ** 2

  def basis_chunk(self, c):
    """Chunk c of the radial basis: its functions b (and mask), rbf [block_r, block_b] (zero past B) and the
    distance minus each centre."""
    b, b_ok = arange(c * self.tiles.block_b, self.tiles.block_b, self.num_b)
    mu = pltriton.load(self.centers_ref.at[b], mask=b_ok, other=0.0).astype(jnp.float32)
    diff = self.distance[:, None] - mu[None, :]
    return b, b_ok, jnp.where(b_ok[None, :], jnp.exp(-(diff * diff) / (2.0 * self.sigma2)), 0.0), diff

  def first_layer(self, w_rbf_t_ref, width: int, tangent: bool):
    """(x_0, dx_0 / d distance) [block_r, width] each: x_0 = rbf W_rbf + target_rows[n] + source_table[z] (padded
    columns zero), from W_rbf^T; dx_0 = rbf' W_rbf with rbf'_b = -(d - mu_b) / sigma^2 rbf_b, or None without
    ``tangent``."""
    a, a_ok = arange(0, width, w_rbf_t_ref.shape[0])
    z = pltriton.load(self.numbers_ref.at[self.r], mask=self.r_ok, other=0)
    n = self.r // self.num_k
    mask = self.r_ok[:, None] & a_ok[None, :]
    x = pltriton.load(self.target_ref.at[n[:, None], a[None, :]], mask=mask, other=0.0).astype(jnp.float32)
    x = x + pltriton.load(self.source_ref.at[z[:, None], a[None, :]], mask=mask, other=0.0).astype(jnp.float32)

    def step(c, carry):
      b, b_ok, rbf, diff = self.basis_chunk(c)
      w = pltriton.load(w_rbf_t_ref.at[a[:, None], b[None, :]], mask=a_ok[:, None] & b_ok[None, :], other=0.0)
      w = w.astype(jnp.float32)
      product = lambda x: _dot(x, w, self.tiles.precision, transpose_w=True)
      x, dx = carry
      return x + product(rbf), (dx + product(-(diff / self.sigma2) * rbf) if tangent else None)

    return lax.fori_loop(0, pl.cdiv(self.num_b, self.tiles.block_b), step, (x, jnp.zeros_like(x) if tangent else None))


def _centred(x, num: int):
  """x - mean(x) over the first ``num`` columns of x [R, Wp], zero in the others."""
  ok = arange(0, x.shape[1], num)[1][None, :]
  return jnp.where(ok, x - jnp.sum(x, axis=1, keepdims=True) / num, 0.0)


def _normalised(x, num: int):
  """(x - mean) / sqrt(var + eps) over the first ``num`` columns of x [R, Wp] (zero in the others), and the
  reciprocal deviation [R, 1]."""
  centred = _centred(x, num)
  rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / num + LAYER_NORM_EPSILON)
  return centred * rstd, rstd


def _normalised_tangent(xhat, rstd, dx, num: int):
  """The tangent of ``_normalised`` for the tangent dx of x: rstd (dc - xhat mean(xhat dc)), dc = dx - mean(dx)
  over the first ``num`` columns (zero in the others)."""
  d_centred = _centred(dx, num)
  return rstd * (d_centred - xhat * (jnp.sum(xhat * d_centred, axis=1, keepdims=True) / num))


def _split_refs(refs, num_norms: int, num_linears: int):
  """(norm refs [(scale, bias)], linear refs [(w, b)], the rest) of a kernel's trailing refs."""
  norms = [refs[2 * i : 2 * i + 2] for i in range(num_norms)]
  start = 2 * num_norms
  linears = [refs[start + 2 * i : start + 2 * i + 2] for i in range(num_linears)]
  return norms, linears, refs[start + 2 * num_linears :]


def _widths(w_rbf_t_ref, linear_refs) -> list[int]:
  """Real widths of x_0, x_1, ... (the input of each norm, then the last Linear's output), from the transposed
  weights."""
  return [w_rbf_t_ref.shape[0]] + [w.shape[0] for w, _ in linear_refs]


def _forward_kernel(
  dist_ref,
  target_ref,
  source_ref,
  numbers_ref,
  centers_ref,
  w_rbf_t_ref,
  *refs,
  tiles,
  num_k,
  num_norms,
  num_linears,
  tangent,
):
  """out [N K, O] of the program's slots (refs as ``jnp_radial_profile``'s arguments, flattened, with every weight
  matrix transposed: the products then read their weights with the contracted axis contiguous, which Triton's
  TF32 products on Hopper run faster, docs/kernel.md §9); with ``tangent`` also d out / d distance [N K, O]."""
  norm_refs, linear_refs, out_refs = _split_refs(refs, num_norms, num_linears)
  widths = _widths(w_rbf_t_ref, linear_refs)
  block_r = tiles.tangent_block_r if tangent else tiles.block_r
  program = _Program(tiles, block_r, num_k, dist_ref, target_ref, source_ref, numbers_ref, centers_ref)
  x, dx = program.first_layer(w_rbf_t_ref, _width(widths[0]), tangent)
  for i, (scale_ref, bias_ref) in enumerate(norm_refs):
    padded = x.shape[1]
    xhat, rstd = _normalised(x, widths[i])
    scale = _load_vector(scale_ref, padded)[None, :]
    y = xhat * scale + _load_vector(bias_ref, padded)[None, :]
    gate = _sigmoid(y)
    x = y * gate
    if tangent:  # SiLU'(y) = gate (1 + y (1 - gate))
      dx = _normalised_tangent(xhat, rstd, dx, widths[i]) * scale * gate * (1.0 + y * (1.0 - gate))
    if i < num_linears:
      w_ref, b_ref = linear_refs[i]
      out_padded = _width(widths[i + 1])
      w = _load_matrix(w_ref, out_padded, padded)
      x = _dot(x, w, tiles.precision, transpose_w=True) + _load_vector(b_ref, out_padded)[None, :]
      dx = _dot(dx, w, tiles.precision, transpose_w=True) if tangent else None
  o, o_ok = arange(0, x.shape[1], out_refs[0].shape[1])
  for result, out_ref in zip((x, dx) if tangent else (x,), out_refs, strict=True):
    pltriton.store(
      out_ref.at[program.r[:, None], o[None, :]],
      result.astype(out_ref.dtype),
      mask=program.r_ok[:, None] & o_ok[None, :],
    )


def _flat_args(distance, target_rows, source_table, source_numbers, centers, w_rbf, norms, linears):
  """The kernel's operands: the slot arrays flattened to [N K], then the weights in order, matrices transposed."""
  flat = (distance.reshape(-1), target_rows, source_table, source_numbers.reshape(-1), centers, w_rbf.T)
  return flat + tuple(x for pair in norms for x in pair) + tuple(x for w, b in linears for x in (w.T, b))


def _forward(tiles: RadialTiles, *args, tangent: bool = False):
  """The kernel's result [N, K, O] for the op's arguments (with the basis centres after the element numbers); with
  ``tangent``, (result, d result / d distance)."""
  distance, w_rbf, norms, linears = args[0], args[5], args[6], args[7]
  width = linears[-1][0].shape[1] if linears else w_rbf.shape[1]
  kernel = functools.partial(
    _forward_kernel,
    tiles=tiles,
    num_k=distance.shape[1],
    num_norms=len(norms),
    num_linears=len(linears),
    tangent=tangent,
  )
  out = jax.ShapeDtypeStruct((distance.size, width), distance.dtype)
  block_r, launch = (tiles.tangent_block_r, tiles.tangent_launch) if tangent else (tiles.block_r, tiles.launch)
  call = launch.call(kernel, [out] * (1 + tangent), (pl.cdiv(distance.size, block_r),))
  return tuple(x.reshape(distance.shape + (width,)) for x in call(*_flat_args(*args)))


def _twin(tiles: RadialTiles, distance, target_rows, source_table, numbers, w_rbf, norms, linears):
  return jnp_radial_profile(
    distance, target_rows, source_table, numbers, w_rbf, norms, linears, basis=tiles.basis, precision=tiles.precision
  )


def _twin_and_tangent(tiles: RadialTiles, distance, target_rows, source_table, numbers, w_rbf, norms, linears):
  """The twin's (out, d out / d distance), differentiable to any order in reverse mode."""
  profile = lambda d: _twin(tiles, d, target_rows, source_table, numbers, w_rbf, norms, linears)
  return jax.jvp(profile, (distance,), (jnp.ones_like(distance),))


def _pullback(fn, args, cts):
  """The cotangents of the op's arguments ``args`` for the cotangents cts of fn's output (fn takes the twin's
  arguments): the float arguments', None for the element numbers and the basis centres."""
  distance, target_rows, source_table, numbers, _, w_rbf, norms, linears = args
  floats = (distance, target_rows, source_table, w_rbf, norms, linears)
  _, pullback = jax.vjp(lambda d, t, s, w, nm, ln: fn(d, t, s, numbers, w, nm, ln), *floats)
  d_distance, d_target, d_source, d_w_rbf, d_norms, d_linears = pullback(cts)
  return (d_distance, d_target, d_source, None, None, d_w_rbf, d_norms, d_linears)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _profile_and_tangent(tiles: RadialTiles, args):
  """(out, d out / d distance) [N, K, O] each, by the tangent kernel."""
  return _forward(tiles, *args, tangent=True)


def _profile_and_tangent_fwd(tiles, args):
  reject_forward_mode(args)
  # Calling the custom_vjp function (not the kernel) keeps an outer reverse pass on these rules.
  return _profile_and_tangent(tiles, args), args


def _profile_and_tangent_bwd(tiles, args, cts):
  return (_pullback(functools.partial(_twin_and_tangent, tiles), args, cts),)


_profile_and_tangent.defvjp(_profile_and_tangent_fwd, _profile_and_tangent_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _radial_profile(tiles: RadialTiles, args):
  return _forward(tiles, *args)[0]


def _radial_profile_fwd(tiles, args):
  reject_forward_mode(args)
  out, tangent = _profile_and_tangent(tiles, args)
  return out, (args, tangent)


def _radial_profile_bwd(tiles, residuals, ct):
  args, tangent = residuals
  # The parameters' cotangents in XLA, by the twin: dropped from programs that do not read them (forces).
  cts = _pullback(functools.partial(_twin, tiles), args, ct)
  return ((jnp.sum(ct * tangent, axis=-1),) + cts[1:],)


_radial_profile.defvjp(_radial_profile_fwd, _radial_profile_bwd)


def pallas_radial_profile(
  distance,
  target_rows,
  source_table,
  source_numbers,
  w_rbf,
  norms,
  linears,
  *,
  basis: tuple[float, int, float],
  precision: str = "highest",
  interpret: bool | None = None,
  block_r: int = 128,
  block_b: int = 32,
  num_warps: int = 8,
  num_stages: int = 1,
  tangent_block_r: int | None = None,
  tangent_num_warps: int = 8,
  tangent_num_stages: int = 1,
):
  """Fused radial profile; same math, arguments and result as ``radial_jnp.jnp_radial_profile``.

  Args:
    distance, target_rows, source_table, source_numbers, w_rbf, norms, linears, basis: as
      ``jnp_radial_profile`` (float32).
    precision: matmul precision of the products; the basis, norms, activations and accumulations are float32.
    interpret: run the kernels in Pallas interpret mode; None = when the default backend is not a GPU.
    block_r: slots per program (a power of two).
    block_b: radial basis functions per step of the first layer (a power of two, >= 16).
    num_warps, num_stages: Triton launch parameters.
    tangent_block_r, tangent_num_warps, tangent_num_stages: block_r and the launch parameters of the kernel that
      also writes the distance tangent (differentiated calls); tangent_block_r None: 128 slots where no layer is
      wider than 128, else 32 (it holds two [block_r, width] arrays per layer in registers).
    The defaults are the fastest tilings measured for the model's three kinds of profile (benchmarks/radial.py,
    H100, TF32, 4,096 atoms, 2026-12-07; the tangent kernel's with ``--cases forces``).

  Returns:
    [N, K, O]. Differentiable in reverse mode to any order (``jax.custom_vjp``: the distances' cotangent from the
    tangent kernel, every other cotangent and all higher orders from the twin); forward mode raises a TypeError.
  """
  norms = tuple(tuple(pair) for pair in norms)
  linears = tuple(tuple(pair) for pair in linears)
  check_layers(w_rbf, norms, linears)
  num_n, num_k = distance.shape
  if target_rows.shape != (num_n, w_rbf.shape[1]) or source_table.shape[1:] != w_rbf.shape[1:]:
    raise ValueError(
      f"target_rows must be [N, A] = {(num_n, w_rbf.shape[1])} and source_table [S, A]; got {target_rows.shape}, "
      f"{source_table.shape}"
    )
  if source_numbers.shape != distance.shape or w_rbf.shape[0] != basis[1]:
    raise ValueError(
      f"source_numbers must be [N, K] = {distance.shape} and w_rbf [B, A] with B = {basis[1]} basis functions; got "
      f"{source_numbers.shape}, {w_rbf.shape}"
    )
  if tangent_block_r is None:
    widest = max([w_rbf.shape[1]] + [w.shape[1] for w, _ in linears])
    tangent_block_r = 128 if widest <= 128 else 32
  if block_r & (block_r - 1) or tangent_block_r & (tangent_block_r - 1) or block_b < 16 or block_b & (block_b - 1):
    raise ValueError(
      f"block_r and tangent_block_r must be powers of two and block_b a power of two >= 16, got {block_r}, "
      f"{tangent_block_r}, {block_b}"
    )
  args = (distance, target_rows, source_table, source_numbers, basis_centers(basis[0], basis[1]), w_rbf, norms, linears)
  reject_forward_mode(args)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tiles = RadialTiles(
    block_r,
    block_b,
    tuple(basis),
    precision,
    Launch(bool(interpret), num_warps, num_stages),
    tangent_block_r,
    Launch(bool(interpret), tangent_num_warps, tangent_num_stages),
  )
  return _radial_profile(tiles, args)
