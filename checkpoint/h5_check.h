// Checked HDF5 calls: H5_CHECK(call) throws braid::Error("file:line: call failed") when an HDF5
// call returns a negative status or id. HDF5's own error printing is switched off by
// h5_quiet() so a failure is reported once, by us.
#pragma once

#include <hdf5.h>

#include "runtime/check.h"

#define H5_CHECK(call)                                                                     \
  ([&]() {                                                                                 \
    const auto braid_h5_status_ = (call);                                                  \
    if (braid_h5_status_ < 0) ::braid::detail::fail(__FILE__, __LINE__, #call, " failed"); \
    return braid_h5_status_;                                                               \
  }())

namespace braid {

inline void h5_quiet() {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

// Closes an HDF5 id of any kind when it leaves scope.
class H5Id {
 public:
  explicit H5Id(hid_t id = -1) : id_(id) {}
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  H5Id(H5Id&& o) noexcept : id_(o.id_) { o.id_ = -1; }
  ~H5Id() {
    if (id_ < 0) return;
    switch (H5Iget_type(id_)) {
      case H5I_FILE:
        H5Fclose(id_);
        break;
      case H5I_GROUP:
        H5Gclose(id_);
        break;
      case H5I_DATASET:
        H5Dclose(id_);
        break;
      case H5I_DATASPACE:
        H5Sclose(id_);
        break;
      case H5I_DATATYPE:
        H5Tclose(id_);
        break;
      case H5I_ATTR:
        H5Aclose(id_);
        break;
      case H5I_GENPROP_LST:
        H5Pclose(id_);
        break;
      default:
        break;
    }
  }
  operator hid_t() const { return id_; }

 private:
  hid_t id_;
};

}  // namespace braid
