"""Function-preserving morphisms: add units, Net2Net split, identity/zero-gated layer insertion."""

from growjax.morph.core import (add_units, check_site_shapes, get_site, insert_layer,
                                new_unit_slices, split_units, widen_field)

__all__ = ["add_units", "check_site_shapes", "get_site", "insert_layer", "new_unit_slices",
           "split_units", "widen_field"]
