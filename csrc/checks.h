// Input checks shared by the launchers: every error a caller can cause becomes a TypeError/ValueError with one
// sentence naming the buffer and the fix.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

namespace fastgpt2 {

namespace py = pybind11;

inline std::string shape_string(const py::array& a) {
  std::string shape = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(a.shape(d));
  return shape + (a.ndim() == 1 ? ",)" : ")");
}

// a as a C-contiguous array of T with the given shape (-1 matches any size).
template <typename T>
py::array_t<T, py::array::c_style> checked_array(const py::array& a, const char* name, const char* dtype,
                                                 const std::vector<py::ssize_t>& shape) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::type_error(std::string(name) + " must be a " + dtype + " array, got dtype " +
                         py::str(a.dtype()).cast<std::string>());
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || a.shape(d) == shape[d];
  if (!ok) {
    std::string want = "(";
    for (size_t d = 0; d < shape.size(); ++d)
      want += (d ? ", " : "") + (shape[d] < 0 ? std::string("*") : std::to_string(shape[d]));
    throw py::value_error(std::string(name) + " must have shape " + want + (shape.size() == 1 ? ",)" : ")") +
                          ", got " + shape_string(a));
  }
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous; call .contiguous() first");
  return py::array_t<T, py::array::c_style>::ensure(a);
}

}  // namespace fastgpt2
