// Both extension modules export the shared codes of csrc/codes.h the same way:
// DTYPE_CODES and SPARSIFIER_MODES, {name: code}, which pymerge/_native.py checks at import.
#pragma once
#include <pybind11/pybind11.h>
#include "codes.h"

namespace pymerge_codes {

inline void export_codes(pybind11::module_& m) {
  pybind11::dict dtypes, modes;
  for (auto d : kDTypeNames) dtypes[d.name] = d.code;
  for (auto d : kModeNames) modes[d.name] = d.code;
  m.attr("DTYPE_CODES") = dtypes;
  m.attr("SPARSIFIER_MODES") = modes;
}

}  // namespace pymerge_codes
