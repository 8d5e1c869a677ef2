"""Numerics: Zernike polynomials on the disk (evaluation, quadrature, interpolation) in JAX.

Greengard & Serkh (2018), "Zernike polynomials: evaluation, quadrature, and interpolation",
arXiv:1811.02720. Modules: ``zernike`` (indexing, evaluation, derivatives, radial functions in
D dimensions), ``quadrature`` (disk grids, the transform pair), ``zernike_layer`` (a flax layer
whose degree grows by appending zero coefficients) and ``zernike_reference`` (exact rational
reference values for tests and benchmarks).
"""

from growjax.numerics.quadrature import (
    DiskGrid,
    disk_grid,
    disk_mean,
    inverse_zernike_transform,
    zernike_transform,
)
from growjax.numerics.zernike import (
    degree_of_num_modes,
    mode_indices,
    nm_to_noll,
    nm_to_osa,
    noll_to_nm,
    noll_to_osa,
    normalization_factors,
    num_modes,
    osa_to_nm,
    osa_to_noll,
    radial_basis,
    radial_indices,
    zernike_basis,
    zernike_basis_grad,
    zernike_basis_polar,
    zernike_expansion,
    zernike_mode,
)
from growjax.numerics.zernike_layer import ZernikeLayer, grow_degree

__all__ = [
    "DiskGrid",
    "ZernikeLayer",
    "degree_of_num_modes",
    "disk_grid",
    "disk_mean",
    "grow_degree",
    "inverse_zernike_transform",
    "mode_indices",
    "nm_to_noll",
    "nm_to_osa",
    "noll_to_nm",
    "noll_to_osa",
    "normalization_factors",
    "num_modes",
    "osa_to_nm",
    "osa_to_noll",
    "radial_basis",
    "radial_indices",
    "zernike_basis",
    "zernike_basis_grad",
    "zernike_basis_polar",
    "zernike_expansion",
    "zernike_mode",
    "zernike_transform",
]
