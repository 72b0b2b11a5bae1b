"""The radial profile of the edges as fused Pallas kernels lowered to Triton (``implementation="pallas"``).

Computes what ``radial_jnp.jnp_radial_profile`` computes (the math is in that module's docstring) with only the
result in device memory. In XLA the MLP crosses device memory several times per layer: the radial basis [N, K, B]
(B = 256 for the paper's models), the first layer's sum with the gathered type rows, each LayerNorm's and SiLU's
input and output, each product's output, all [N, K, A] with A = 128. One program here takes ``block_r``
consecutive slots (rows of the flat [N K] slot axis): it loads each slot's distance, its target's row and its
source element's row, forms the radial basis in chunks of ``block_b`` functions and multiplies each chunk by its
rows of W_rbf as it goes, then applies the norms, SiLUs and Linears in registers and writes [block_r, O].

Gradients (``jax.custom_vjp``). Forces need the cotangent of the distances only: the backward kernel recomputes
a program's forward pass in registers, keeping each norm's input, runs the chain back to the first layer and
contracts d x_0 with the basis functions' derivatives, chunk by chunk: it writes d distance [N, K] and nothing
else. The other inputs (the type rows and every weight) depend on the parameters alone; their cotangents are the
jnp twin's, in XLA, and are dropped from programs that do not read them (energies and forces, molecular
dynamics). The backward kernel's own derivative (force matching: reverse over reverse) is the twin's.

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
from pallas_kernels.pallas import _arange, _Launch, _reject_forward_mode
from pallas_kernels.radial_jnp import (
  LAYER_NORM_EPSILON,
  basis_centers,
  basis_sigma,
  check_layers,
  jnp_radial_profile,
)

REGISTER_BUDGET = 8192  # float32 elements of the widest [block_r, width] array a program holds by default


@dataclasses.dataclass(frozen=True)
class RadialTiles:
  """Static setting of the radial-profile kernels (hashable: a ``nondiff_argnums`` argument).

  Attributes:
    block_r: slots per program.
    block_b: radial basis functions per step of the first layer's walk.
    basis: (cutoff, num_basis, width) of the radial basis.
    precision: matmul precision of the products ("highest", "tensorfloat32", "bfloat16").
    launch: Triton launch parameters and interpret mode.
  """

  block_r: int
  block_b: int
  basis: tuple[float, int, float]
  precision: str
  launch: _Launch


def _load_matrix(ref, num_rows_padded: int, num_cols_padded: int):
  """A whole [I, O] weight, padded with zeros to [Ip, Op], as float32."""
  i, i_ok = _arange(0, num_rows_padded, ref.shape[0])
  o, o_ok = _arange(0, num_cols_padded, ref.shape[1])
  w = pltriton.load(ref.at[i[:, None], o[None, :]], mask=i_ok[:, None] & o_ok[None, :], other=0.0)
  return w.astype(jnp.float32)


def _load_vector(ref, num_padded: int):
  """A whole [O] vector, padded with zeros to [Op], as float32."""
  o, o_ok = _arange(0, num_padded, ref.shape[0])
  return pltriton.load(ref.at[o], mask=o_ok, other=0.0).astype(jnp.float32)


def _sigmoid(y):
  return 1.0 / (1.0 + jnp.exp(-y))


class _Program:
  """The slots of one program and what the forward and backward kernels compute the same way for them."""

  def __init__(self, tiles: RadialTiles, num_k: int, dist_ref, target_ref, source_ref, numbers_ref, centers_ref):
    self.tiles, self.num_k = tiles, num_k
    self.num_r = dist_ref.shape[0]
    self.r, self.r_ok = _arange(pl.program_id(0) * tiles.block_r, tiles.block_r, self.num_r)
    self.distance = pltriton.load(dist_ref.at[self.r], mask=self.r_ok, other=1.0).astype(jnp.float32)
    self.refs = (target_ref, source_ref, numbers_ref, centers_ref)
    cutoff, num_basis, width = tiles.basis
    self.num_b, self.two_sigma2 = num_basis, 2.0 * basis_sigma(cutoff, num_basis, width) ** 2

  def basis_chunk(self, c):
    """Chunk c of the radial basis: its functions b (and mask) and rbf [block_r, block_b] (zero past B)."""
    b, b_ok = _arange(c * self.tiles.block_b, self.tiles.block_b, self.num_b)
    mu = pltriton.load(self.refs[3].at[b], mask=b_ok, other=0.0).astype(jnp.float32)
    diff = self.distance[:, None] - mu[None, :]
    return b, b_ok, diff, jnp.where(b_ok[None, :], jnp.exp(-(diff * diff) / self.two_sigma2), 0.0)

  def first_layer(self, w_rbf_ref, width: int):
    """x_0 [block_r, width] = rbf W_rbf + target_rows[n] + source_table[z] (padded columns zero)."""
    target_ref, source_ref, numbers_ref, _ = self.refs
    num_a = w_rbf_ref.shape[1]
    a, a_ok = _arange(0, width, num_a)
    z = pltriton.load(numbers_ref.at[self.r], mask=self.r_ok, other=0)
    n = self.r // self.num_k
    mask = self.r_ok[:, None] & a_ok[None, :]
    x = pltriton.load(target_ref.at[n[:, None], a[None, :]], mask=mask, other=0.0).astype(jnp.float32)
    x = x + pltriton.load(source_ref.at[z[:, None], a[None, :]], mask=mask, other=0.0).astype(jnp.float32)

    def step(c, x):
      b, b_ok, _, rbf = self.basis_chunk(c)
      w = pltriton.load(w_rbf_ref.at[b[:, None], a[None, :]], mask=b_ok[:, None] & a_ok[None, :], other=0.0)
      return x + _dot(rbf, w.astype(jnp.float32), self.tiles.precision)

    return lax.fori_loop(0, pl.cdiv(self.num_b, self.tiles.block_b), step, x)

  def distance_cotangent(self, w_rbf_ref, dx0):
    """d distance [block_r] from the cotangent dx0 [block_r, width] of x_0: sum_b (dx0 W_rbf^T)_b d rbf_b / d d."""
    num_a = w_rbf_ref.shape[1]
    a, a_ok = _arange(0, dx0.shape[1], num_a)

    def step(c, dd):
      b, b_ok, diff, rbf = self.basis_chunk(c)
      w = pltriton.load(w_rbf_ref.at[b[:, None], a[None, :]], mask=b_ok[:, None] & a_ok[None, :], other=0.0)
      d_rbf = _dot(dx0, w.astype(jnp.float32), self.tiles.precision, transpose_w=True)  # [block_r, block_b]
      return dd + jnp.sum(d_rbf * rbf * diff, axis=1) * (-2.0 / self.two_sigma2)

    return lax.fori_loop(0, pl.cdiv(self.num_b, self.tiles.block_b), step, jnp.zeros_like(self.distance))


def _normalised(x, num: int):
  """(x - mean) * rstd over the first ``num`` columns of x [R, Wp] (zero in the others), and rstd [R, 1]."""
  ok = _arange(0, x.shape[1], num)[1][None, :]
  centred = jnp.where(ok, x - jnp.sum(x, axis=1, keepdims=True) / num, 0.0)
  rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / num + LAYER_NORM_EPSILON)
  return centred * rstd, rstd


def _split_refs(refs, num_norms: int, num_linears: int):
  """(norm refs [(scale, bias)], linear refs [(w, b)], the rest) of a kernel's trailing refs."""
  norms = [refs[2 * i : 2 * i + 2] for i in range(num_norms)]
  start = 2 * num_norms
  linears = [refs[start + 2 * i : start + 2 * i + 2] for i in range(num_linears)]
  return norms, linears, refs[start + 2 * num_linears :]


def _widths(w_rbf_ref, linear_refs) -> list[int]:
  """Real widths of x_0, x_1, ... (the input of each norm, then the last Linear's output)."""
  return [w_rbf_ref.shape[1]] + [w.shape[1] for w, _ in linear_refs]


def _forward_kernel(
  dist_ref, target_ref, source_ref, numbers_ref, centers_ref, w_rbf_ref, *refs, tiles, num_k, num_norms, num_linears
):
  """out [N K, O] of the program's ``block_r`` slots (refs as ``jnp_radial_profile``'s arguments, flattened)."""
  norm_refs, linear_refs, (out_ref,) = _split_refs(refs, num_norms, num_linears)
  widths = _widths(w_rbf_ref, linear_refs)
  program = _Program(tiles, num_k, dist_ref, target_ref, source_ref, numbers_ref, centers_ref)
  x = program.first_layer(w_rbf_ref, _width(widths[0]))
  for i, (scale_ref, bias_ref) in enumerate(norm_refs):
    padded = x.shape[1]
    xhat, _ = _normalised(x, widths[i])
    y = xhat * _load_vector(scale_ref, padded)[None, :] + _load_vector(bias_ref, padded)[None, :]
    x = y * _sigmoid(y)
    if i < num_linears:
      w_ref, b_ref = linear_refs[i]
      out_padded = _width(widths[i + 1])
      x = _dot(x, _load_matrix(w_ref, padded, out_padded), tiles.precision) + _load_vector(b_ref, out_padded)[None, :]
  o, o_ok = _arange(0, x.shape[1], out_ref.shape[1])
  pltriton.store(
    out_ref.at[program.r[:, None], o[None, :]], x.astype(out_ref.dtype), mask=program.r_ok[:, None] & o_ok[None, :]
  )


def _backward_kernel(
  dist_ref,
  target_ref,
  source_ref,
  numbers_ref,
  centers_ref,
  w_rbf_ref,
  *refs,
  tiles,
  num_k,
  num_norms,
  num_linears,
):
  """d distance [N K] from the cotangent ct [N K, O] of the output, for the program's ``block_r`` slots."""
  norm_refs, linear_refs, (ct_ref, dd_ref) = _split_refs(refs, num_norms, num_linears)
  widths = _widths(w_rbf_ref, linear_refs)
  program = _Program(tiles, num_k, dist_ref, target_ref, source_ref, numbers_ref, centers_ref)
  # Forward pass, keeping each norm's input.
  inputs, x = [], program.first_layer(w_rbf_ref, _width(widths[0]))
  for i, (scale_ref, bias_ref) in enumerate(norm_refs[:-1]):
    inputs.append(x)
    padded = x.shape[1]
    y = _normalised(x, widths[i])[0] * _load_vector(scale_ref, padded)[None, :]
    y = y + _load_vector(bias_ref, padded)[None, :]
    w_ref, b_ref = linear_refs[i]
    out_padded = _width(widths[i + 1])
    x = _dot(y * _sigmoid(y), _load_matrix(w_ref, padded, out_padded), tiles.precision)
    x = x + _load_vector(b_ref, out_padded)[None, :]
  inputs.append(x)
  # Backward pass: g is the cotangent of the last norm's SiLU output, then of each earlier one's.
  o, o_ok = _arange(0, _width(widths[-1]), ct_ref.shape[1])
  ct = pltriton.load(ct_ref.at[program.r[:, None], o[None, :]], mask=program.r_ok[:, None] & o_ok[None, :], other=0.0)
  g = ct.astype(jnp.float32)
  if num_linears == num_norms:
    w = _load_matrix(linear_refs[-1][0], _width(widths[-2]), _width(widths[-1]))
    g = _dot(g, w, tiles.precision, transpose_w=True)
  for i in reversed(range(num_norms)):
    scale_ref, bias_ref = norm_refs[i]
    x = inputs[i]
    padded = x.shape[1]
    xhat, rstd = _normalised(x, widths[i])
    scale = _load_vector(scale_ref, padded)[None, :]
    y = xhat * scale + _load_vector(bias_ref, padded)[None, :]
    s = _sigmoid(y)
    d_xhat = g * s * (1.0 + y * (1.0 - s)) * scale
    mean_d = jnp.sum(d_xhat, axis=1, keepdims=True) / widths[i]
    mean_dx = jnp.sum(d_xhat * xhat, axis=1, keepdims=True) / widths[i]
    ok = _arange(0, padded, widths[i])[1][None, :]
    g = jnp.where(ok, rstd * (d_xhat - mean_d - xhat * mean_dx), 0.0)  # the cotangent of x_i
    if i > 0:
      w = _load_matrix(linear_refs[i - 1][0], _width(widths[i - 1]), padded)
      g = _dot(g, w, tiles.precision, transpose_w=True)
  pltriton.store(dd_ref.at[program.r], program.distance_cotangent(w_rbf_ref, g).astype(dd_ref.dtype), mask=program.r_ok)


def _flat_args(distance, target_rows, source_table, source_numbers, centers, w_rbf, norms, linears):
  """The kernels' operands: the slot arrays flattened to [N K], then the weights in order."""
  flat = (distance.reshape(-1), target_rows, source_table, source_numbers.reshape(-1), centers, w_rbf)
  return flat + tuple(x for pair in (*norms, *linears) for x in pair)


def _call(kernel, tiles: RadialTiles, args, out_shape):
  distance, _, _, _, _, _, norms, linears = args
  num_r = distance.size
  kernel = functools.partial(
    kernel, tiles=tiles, num_k=distance.shape[1], num_norms=len(norms), num_linears=len(linears)
  )
  return tiles.launch.call(kernel, out_shape, (pl.cdiv(num_r, tiles.block_r),))


def _forward(tiles: RadialTiles, *args):
  distance, w_rbf, linears = args[0], args[5], args[7]
  width = linears[-1][0].shape[1] if linears else w_rbf.shape[1]
  out = jax.ShapeDtypeStruct((distance.size, width), distance.dtype)
  return _call(_forward_kernel, tiles, args, out)(*_flat_args(*args)).reshape(distance.shape + (width,))


def _distance_cotangent_kernel(tiles: RadialTiles, *args_and_ct):
  *args, ct = args_and_ct
  distance = args[0]
  out = jax.ShapeDtypeStruct((distance.size,), distance.dtype)
  flat = _flat_args(*args) + (ct.reshape(distance.size, ct.shape[-1]),)
  return _call(_backward_kernel, tiles, args, out)(*flat).reshape(distance.shape)


def _twin_cotangents(tiles: RadialTiles, args, ct):
  """The jnp twin's cotangents of every argument for the cotangent ct of the output (differentiable to any order;
  None for the element numbers and the basis centres, which the twin forms from ``tiles.basis``)."""
  distance, target_rows, source_table, numbers, _, w_rbf, norms, linears = args

  def twin(distance, target_rows, source_table, w_rbf, norms, linears):
    return jnp_radial_profile(
      distance, target_rows, source_table, numbers, w_rbf, norms, linears, basis=tiles.basis, precision=tiles.precision
    )

  _, pullback = jax.vjp(twin, distance, target_rows, source_table, w_rbf, norms, linears)
  d_distance, d_target, d_source, d_w_rbf, d_norms, d_linears = pullback(ct)
  return d_distance, d_target, d_source, None, None, d_w_rbf, d_norms, d_linears


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _distance_cotangent(tiles: RadialTiles, args, ct):
  """d distance [N, K] for the cotangent ct [N, K, O] of the output, by the backward kernel."""
  return _distance_cotangent_kernel(tiles, *args, ct)


def _distance_cotangent_fwd(tiles, args, ct):
  _reject_forward_mode(args, ct)
  return _distance_cotangent(tiles, args, ct), (args, ct)


def _distance_cotangent_bwd(tiles, saved, dd):
  def twin(args, ct):
    return _twin_cotangents(tiles, args, ct)[0]

  return jax.vjp(twin, *saved)[1](dd)


_distance_cotangent.defvjp(_distance_cotangent_fwd, _distance_cotangent_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _radial_profile(tiles: RadialTiles, args):
  return _forward(tiles, *args)


def _radial_profile_fwd(tiles, args):
  _reject_forward_mode(args)
  # Calling the custom_vjp function (not the kernel) keeps an outer reverse pass on these rules.
  return _radial_profile(tiles, args), args


def _radial_profile_bwd(tiles, args, ct):
  d_distance = _distance_cotangent(tiles, args, ct)
  # The other cotangents in XLA, by the twin: dropped from programs that do not read them (forces).
  return ((d_distance, *_twin_cotangents(tiles, args, ct)[1:]),)


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
  block_r: int = 0,
  block_b: int = 32,
  num_warps: int = 4,
  num_stages: int = 1,
):
  """Fused radial profile; same math, arguments and result as ``radial_jnp.jnp_radial_profile``.

  Args:
    distance, target_rows, source_table, source_numbers, w_rbf, norms, linears, basis: as
      ``jnp_radial_profile`` (float32).
    precision: matmul precision of the products; the basis, norms, activations and accumulations are float32.
    interpret: run the kernels in Pallas interpret mode; None = when the default backend is not a GPU.
    block_r: slots per program (a power of two); 0 = ``REGISTER_BUDGET`` over the widest padded layer, at most 128.
    block_b: radial basis functions per step of the first layer (a power of two, >= 16).
    num_warps, num_stages: Triton launch parameters.

  Returns:
    [N, K, O]. Differentiable in reverse mode to any order (``jax.custom_vjp``); forward mode raises a TypeError.
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
  widest = max(_width(w.shape[1]) for w in (w_rbf, *(w for w, _ in linears)))
  block_r = block_r or max(16, min(128, REGISTER_BUDGET // widest))
  if block_r & (block_r - 1) or block_b < 16 or block_b & (block_b - 1):
    raise ValueError(f"block_r must be a power of two and block_b a power of two >= 16, got {block_r}, {block_b}")
  args = (distance, target_rows, source_table, source_numbers, basis_centers(basis[0], basis[1]), w_rbf, norms, linears)
  _reject_forward_mode(args)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tiles = RadialTiles(block_r, block_b, tuple(basis), precision, _Launch(bool(interpret), num_warps, num_stages))
  return _radial_profile(tiles, args)
