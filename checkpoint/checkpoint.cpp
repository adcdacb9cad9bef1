#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "checkpoint/h5_check.h"

namespace braid {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string hex(const unsigned char* d, unsigned n) {
  static const char* k = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < n; ++i) s += k[d[i] >> 4], s += k[d[i] & 15];
  return s;
}

std::string sha256_bytes(const void* data, size_t n) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  BRAID_CHECK(EVP_Digest(data, n, out, &len, EVP_sha256(), nullptr) == 1, "SHA-256 failed");
  return hex(out, len);
}

void fsync_path(const std::string& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  BRAID_CHECK(fd >= 0, "cannot open '", p, "' to fsync");
  const int rc = ::fsync(fd);
  ::close(fd);
  BRAID_CHECK(rc == 0, "fsync of '", p, "' failed");
}

hid_t h5_type(DType t) {
  switch (t) {
    case DType::f32:
      return H5T_IEEE_F32LE;
    case DType::f64:
      return H5T_IEEE_F64LE;
    default:
      BRAID_FAIL("checkpoint: tensors of dtype ", dtype_name(t), " are not stored yet");
  }
}
hid_t h5_native(DType t) {
  return t == DType::f64 ? H5T_NATIVE_DOUBLE : H5T_NATIVE_FLOAT;
}

H5Id file_access() {
  H5Id fapl(H5_CHECK(H5Pcreate(H5P_FILE_ACCESS)));
  H5_CHECK(H5Pset_file_locking(fapl, false, true));
  return H5Id(H5Pcopy(fapl));
}

// A manifest file entry {name, sha256}: the name stays in the directory, the file exists and
// matches its digest (checked before libhdf5 opens it).
void check_file_digest(const std::string& dir, const json& f) {
  const std::string name = f.at("name").get<std::string>();
  BRAID_REQUIRE(name.find('/') == std::string::npos && name.find("..") == std::string::npos,
                "checkpoint '", dir, "': file name '", name, "' leaves the checkpoint directory");
  const std::string path = (fs::path(dir) / name).string();
  BRAID_REQUIRE(fs::exists(path), "checkpoint '", dir, "': file ", name, " is missing");
  const std::string got = sha256_file(path), want = f.at("sha256").get<std::string>();
  BRAID_REQUIRE(got == want, "checkpoint '", dir, "': file ", name, " is corrupt (sha256 ", got,
                ", manifest says ", want, ")");
}

// The runs of the flat parameter vector a ZeRO-1 rank holds, per trainable parameter: elements
// [start, start + count) of the parameter, at shard_off in the rank's shard (count 0: none).
struct Zero1Run {
  const Param* param;
  int64_t start, count, shard_off;
};
std::vector<Zero1Run> zero1_runs(const ParamSet& params, const Zero1AdamW& opt) {
  const int64_t lo = opt.shard_begin(), hi = lo + opt.shard_size();
  std::vector<Zero1Run> out;
  for (const Param& p : params.all()) {
    if (!p.trainable || p.region != opt.region()) continue;
    const int64_t off = params.region_offset(p), a = std::max(off, lo),
                  b = std::min(off + p.value.numel(), hi);
    out.push_back(a < b ? Zero1Run{&p, a - off, b - a, a - lo} : Zero1Run{&p, 0, 0, 0});
  }
  return out;
}

// A parameter's run [start, start + count) of its local elements as pieces of its logical
// tensor: one per box the run meets (no box: the whole tensor), each with where its elements
// start in the run (at). A run of no elements still names the tensor.
struct BoxRun {
  std::vector<int64_t> off, ext;
  int64_t start, count, at;
};
std::vector<BoxRun> box_runs(const Param& p, int64_t start, int64_t count) {
  if (p.boxes.empty()) return {{{}, {}, start, count, 0}};
  if (count == 0) return {{p.boxes[0].offset, p.boxes[0].shape, 0, 0, 0}};
  std::vector<BoxRun> out;
  for (const ParamBox& b : p.boxes) {
    const int64_t lo = std::max(start, b.local_start),
                  hi = std::min(start + count, b.local_start + b.numel());
    if (lo < hi) out.push_back({b.offset, b.shape, lo - b.local_start, hi - lo, lo - start});
  }
  return out;
}

// A part of a tensor: elements [start, start + count) of the row-major flattening of a box
// (off, ext per dimension; both empty: the whole tensor).
struct Region {
  std::vector<int64_t> shape, off, ext;
  int64_t start = 0, count = 0;
  int64_t volume() const {
    int64_t n = 1;
    for (int64_t x : off.empty() ? shape : ext) n *= x;
    return n;
  }
};

// Checks a region (errors name `what`) and drops a box that is the whole tensor.
Region make_region(std::vector<int64_t> shape, std::vector<int64_t> off, std::vector<int64_t> ext,
                   int64_t start, int64_t count, const std::string& what) {
  Region r{std::move(shape), std::move(off), std::move(ext), start, count};
  BRAID_REQUIRE(r.off.size() == r.ext.size() && (r.off.empty() || r.off.size() == r.shape.size()),
                what, ": a box needs an offset and an extent per dimension of the ", r.shape.size(),
                "-dim tensor");
  bool whole = true;
  for (size_t d = 0; d < r.off.size(); ++d) {
    BRAID_REQUIRE(r.off[d] >= 0 && r.ext[d] >= 1 && r.off[d] + r.ext[d] <= r.shape[d], what,
                  ": box [", r.off[d], ", ", r.off[d] + r.ext[d], ") of dimension ", d,
                  " outside its extent ", r.shape[d]);
    whole = whole && r.off[d] == 0 && r.ext[d] == r.shape[d];
  }
  if (whole) r.off.clear(), r.ext.clear();
  BRAID_REQUIRE(start >= 0 && count >= 0 && start + count <= r.volume(), what, ": elements [",
                start, ", ", start + count, ") outside the ", r.volume(), " of its ",
                r.off.empty() ? "tensor" : "box");
  return r;
}

// A stretch of a region contiguous in the tensor: its elements [local, local + len) are the
// tensor's row-major elements [global, global + len).
struct Run {
  int64_t global, local, len;
};
// The region's runs in increasing global (and local) order, adjacent ones merged.
std::vector<Run> region_runs(const Region& r) {
  std::vector<Run> out;
  if (r.count == 0) return out;
  if (r.off.empty()) return {{r.start, 0, r.count}};
  const int nd = static_cast<int>(r.shape.size());
  std::vector<int64_t> stride(nd, 1);
  for (int d = nd - 2; d >= 0; --d) stride[d] = stride[d + 1] * r.shape[d + 1];
  const int64_t inner = r.ext[nd - 1], end = r.start + r.count;
  for (int64_t row = r.start / inner; row * inner < end; ++row) {
    int64_t rem = row, g = r.off[nd - 1];
    for (int d = nd - 2; d >= 0; --d) {
      g += (r.off[d] + rem % r.ext[d]) * stride[d];
      rem /= r.ext[d];
    }
    const int64_t lo = std::max(r.start, row * inner), hi = std::min(end, (row + 1) * inner);
    const Run run{g + lo - row * inner, lo - r.start, hi - lo};
    if (!out.empty() && out.back().global + out.back().len == run.global)
      out.back().len += run.len;
    else
      out.push_back(run);
  }
  return out;
}
// Where two regions' runs overlap: elements [a, a + len) of the first region's storage are
// elements [b, b + len) of the second's.
struct Overlap {
  int64_t a, b, len;
};
std::vector<Overlap> overlaps(const std::vector<Run>& x, const std::vector<Run>& y) {
  std::vector<Overlap> out;
  for (size_t i = 0, j = 0; i < x.size() && j < y.size();) {
    const int64_t lo = std::max(x[i].global, y[j].global),
                  hi = std::min(x[i].global + x[i].len, y[j].global + y[j].len);
    if (lo < hi)
      out.push_back({x[i].local + lo - x[i].global, y[j].local + lo - y[j].global, hi - lo});
    (x[i].global + x[i].len < y[j].global + y[j].len) ? ++i : ++j;
  }
  return out;
}

// The dataset of a piece: "/kind/name" (the whole tensor, in its shape), "/kind/name@o0_o1.."
// (a whole box, in its shape), else a 1-D run "/kind/name@[o0_o1..:]start".
std::string piece_dataset(const std::string& key, const Region& r) {
  std::string box;
  for (size_t d = 0; d < r.off.size(); ++d) box += (d ? "_" : "") + std::to_string(r.off[d]);
  const bool full = r.start == 0 && r.count == r.volume();
  if (box.empty()) return "/" + key + (full ? "" : "@" + std::to_string(r.start));
  return "/" + key + "@" + box + (full ? "" : ":" + std::to_string(r.start));
}

// The region of manifest piece pc of tensor t (format 1 pieces are whole tensors).
Region piece_region(const json& t, const json& pc, const std::string& what) {
  const std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
  const std::vector<int64_t> off = pc.value("box_offset", std::vector<int64_t>{}),
                             ext = pc.value("box_shape", std::vector<int64_t>{});
  int64_t vol = 1;
  for (int64_t x : off.empty() ? shape : ext) vol *= x;
  return make_region(shape, off, ext, pc.value("start", int64_t(0)), pc.value("count", vol), what);
}

// Opens dataset `ds` ("/kind/name") of a checkpoint file, refusing what could make libhdf5 read
// outside the file or run code: every link on the path must be a hard link (no soft or external
// links), and the dataset must be stored in the file itself, without filters (no plugins) and
// not virtual.
hid_t open_dataset_checked(hid_t f, const std::string& ds, const std::string& dir,
                           const std::string& file) {
  for (size_t at = ds.find('/', 1);; at = ds.find('/', at + 1)) {
    const std::string prefix = at == std::string::npos ? ds : ds.substr(0, at);
    H5L_info_t info;
    BRAID_REQUIRE(H5Lexists(f, prefix.c_str(), H5P_DEFAULT) > 0 &&
                      H5Lget_info(f, prefix.c_str(), &info, H5P_DEFAULT) >= 0,
                  "checkpoint '", dir, "': dataset ", ds, " is missing from ", file);
    BRAID_REQUIRE(info.type == H5L_TYPE_HARD, "checkpoint '", dir, "': ", prefix, " in ", file,
                  " is ", info.type == H5L_TYPE_EXTERNAL ? "an external" : "a soft",
                  " link; checkpoints hold only their own data");
    if (at == std::string::npos) break;
  }
  const hid_t d = H5Dopen2(f, ds.c_str(), H5P_DEFAULT);
  BRAID_REQUIRE(d >= 0, "checkpoint '", dir, "': ", ds, " in ", file, " is not a dataset");
  H5Id dcpl(H5_CHECK(H5Dget_create_plist(d)));
  const H5D_layout_t layout = H5Pget_layout(dcpl);
  const int filters = H5Pget_nfilters(dcpl), external = H5Pget_external_count(dcpl);
  if (layout == H5D_VIRTUAL || filters != 0 || external != 0) {
    H5Dclose(d);
    BRAID_REJECT("checkpoint '", dir, "': dataset ", ds, " in ", file, " is ",
                 layout == H5D_VIRTUAL ? "virtual"
                 : filters != 0        ? "filtered (a filter pipeline)"
                                       : "stored in external files",
                 "; checkpoints hold plain datasets only");
  }
  return d;
}

// Fault injection for the save-interruption tests: BRAID_FAULT_SAVE=<point>:<n>[:<rank>] ends
// the process at once (status 86, as a crash would) when the n-th save of this process on rank
// <rank> (default 0) reaches <point>: before_data, before_fsync (every rank passes these), and
// on rank 0 before_manifest, mid_manifest (half the manifest written), before_rename. Unset:
// nothing happens. The save count is the one piece of process state this needs.
struct SaveFaults {
  std::string point;
  int64_t nth = 0, saves = 0;
  int rank = 0;
  SaveFaults() {
    const char* e = std::getenv("BRAID_FAULT_SAVE");
    if (!e) return;
    std::string v = e;
    std::vector<std::string> parts;
    for (size_t at; (at = v.find(':')) != std::string::npos; v = v.substr(at + 1))
      parts.push_back(v.substr(0, at));
    parts.push_back(v);
    point = parts[0];
    nth = parts.size() > 1 ? std::stoll(parts[1]) : 1;
    rank = parts.size() > 2 ? std::stoi(parts[2]) : 0;
  }
  void hit(const char* at, int my_rank = 0) const {
    if (!point.empty() && point == at && saves == nth && my_rank == rank) {
      std::fprintf(stderr, "braid: fault injected: save %lld at %s\n", (long long)saves, at);
      std::fflush(stderr);
      ::_exit(86);
    }
  }
};
SaveFaults& save_faults() {
  static SaveFaults faults;
  return faults;
}

}  // namespace

std::vector<CheckpointTensor> host_layout(const std::vector<CheckpointTensor>& tensors,
                                          std::vector<char>& buffer) {
  auto padded = [](const Tensor& t) { return (t.nbytes() + 63) / 64 * 64; };
  size_t total = 0;
  for (const CheckpointTensor& t : tensors) total += padded(t.tensor);
  buffer.resize(total);
  std::vector<CheckpointTensor> out;
  size_t at = 0;
  for (const CheckpointTensor& t : tensors) {
    const Tensor& x = t.tensor;
    out.push_back({t.kind, t.name,
                   Tensor::contiguous_view(
                       buffer.data() + at, x.dtype, Device::cpu,
                       std::vector<int64_t>(x.shape.begin(), x.shape.begin() + x.ndim), x.name)});
    at += padded(x);
  }
  return out;
}

std::vector<CheckpointTensor> training_state(const ParamSet& params, const AdamW& opt) {
  std::vector<CheckpointTensor> out;
  for (const Param& p : params.all()) {
    BRAID_CHECK(p.boxes.empty(), "training_state: parameter ", p.name,
                " is a tensor-parallel shard; a sharded run saves pieces (zero1_pieces)");
    out.push_back({"param", p.name, p.value});
  }
  for (const AdamW::State& s : opt.state()) {
    out.push_back({"master", s.param->name, s.master});
    out.push_back({"exp_avg", s.param->name, s.m});
    out.push_back({"exp_avg_sq", s.param->name, s.v});
  }
  return out;
}

namespace {

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

json read_manifest(const std::string& dir) {
  std::ifstream f(fs::path(dir) / "manifest.json");
  BRAID_REQUIRE(f, "checkpoint '", dir, "': no manifest.json");
  try {
    return json::parse(f);
  } catch (const std::exception& e) {
    BRAID_REJECT("checkpoint '", dir, "': manifest.json is not valid JSON: ", e.what());
  }
}

}  // namespace

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  BRAID_REQUIRE(f, "cannot read '", path, "'");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), std::streamsize(buf.size()));
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(f.gcount()));
  }
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  EVP_DigestFinal_ex(ctx, out, &len);
  EVP_MD_CTX_free(ctx);
  return hex(out, len);
}

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta,
                            const ParamSet& params, const AdamW& opt) {
  return save_checkpoint(root, meta, training_state(params, opt));
}

std::vector<CheckpointPiece> zero1_pieces(const ParamSet& params, const Zero1AdamW& opt,
                                          bool with_params, bool with_replicated) {
  std::vector<CheckpointPiece> out;
  auto writes = [&](const Param& p) {  // a mirror's original is written by its own stage
    return p.region == opt.region() && !p.mirror && (with_replicated || !p.boxes.empty());
  };
  if (with_params)
    for (const Param& p : params.all())
      for (const BoxRun& b : writes(p) ? box_runs(p, 0, p.value.numel()) : std::vector<BoxRun>{})
        out.push_back({"param", p.name, p.value.dtype, p.global_shape, b.start, b.count,
                       static_cast<const char*>(p.value.data) + b.at * dtype_size(p.value.dtype),
                       b.off, b.ext});
  for (const Zero1Run& r : zero1_runs(params, opt)) {
    if (r.count == 0 || !writes(*r.param)) continue;
    const Param& p = *r.param;
    for (auto [kind, vec] :
         {std::pair{"master", opt.shard_master()}, std::pair{"exp_avg", opt.shard_exp_avg()},
          std::pair{"exp_avg_sq", opt.shard_exp_avg_sq()}})
      for (const BoxRun& b : box_runs(p, r.start, r.count))
        out.push_back({kind, p.name, DType::f32, p.global_shape, b.start, b.count,
                       vec + r.shard_off + b.at, b.off, b.ext});
  }
  return out;
}

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta,
                            const std::vector<CheckpointTensor>& entries) {
  std::vector<CheckpointPiece> pieces;
  for (const CheckpointTensor& e : entries) {
    const Tensor& t = e.tensor;
    BRAID_CHECK(t.device == Device::cpu && t.is_contiguous(), "checkpoint: ", t.describe(),
                " must be a contiguous host tensor");
    pieces.push_back({e.kind, e.name, t.dtype,
                      std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim), 0, t.numel(),
                      t.data});
  }
  return save_checkpoint_sharded(root, meta, pieces, nullptr);
}

namespace {

// Gathers every rank's string on rank 0 (in rank order); other ranks get an empty vector.
std::vector<std::string> gather_strings(const std::string& mine, Communicator* world) {
  if (!world || world->size() == 1) return {mine};
  const int p = world->size();
  std::vector<int64_t> lens(p);
  int64_t len = static_cast<int64_t>(mine.size());
  world->all_gather(Tensor::contiguous_view(&len, DType::i64, Device::cpu, {1}, "len"),
                    Tensor::contiguous_view(lens.data(), DType::i64, Device::cpu, {p}, "lens"));
  const int64_t width = *std::max_element(lens.begin(), lens.end());
  std::string padded = mine;
  padded.resize(width);
  std::string all(width * p, '\0');
  world->all_gather(
      Tensor::contiguous_view(padded.data(), DType::u8, Device::cpu, {width}, "s"),
      Tensor::contiguous_view(all.data(), DType::u8, Device::cpu, {width * p}, "all"));
  if (world->rank() != 0) return {};
  std::vector<std::string> out;
  for (int r = 0; r < p; ++r) out.push_back(all.substr(r * width, lens[r]));
  return out;
}

// Throws unless the runs of the pieces of manifest tensor t cover it exactly once, naming the
// first elements in no piece or in two (`saving`: "written by no rank" / "written twice").
void check_runs_cover(const json& t, std::vector<Run> runs, const std::string& prefix,
                      bool saving) {
  const char* none = saving ? "written by no rank" : "in no piece";
  int64_t numel = 1;
  for (int64_t x : t.at("shape").get<std::vector<int64_t>>()) numel *= x;
  std::sort(runs.begin(), runs.end(),
            [](const Run& a, const Run& b) { return a.global < b.global; });
  const std::string key = t.at("kind").get<std::string>() + "/" + t.at("name").get<std::string>();
  int64_t next = 0;
  for (const Run& r : runs) {
    BRAID_REQUIRE(r.global == next, prefix, key, ": elements [", std::min(r.global, next), ", ",
                  std::max(r.global, next), ") are ",
                  r.global > next ? none
                  : saving        ? "written twice"
                                  : "in two pieces");
    next = r.global + r.len;
  }
  BRAID_REQUIRE(next == numel, prefix, key, ": elements [", next, ", ", numel, ") are ", none);
}

// Refuses a save unless the pieces of every tensor cover it exactly once.
void check_coverage(const json& tensors) {
  for (const json& t : tensors) {
    std::vector<Run> runs;
    for (const json& pc : t.at("pieces")) {
      const std::vector<Run> r = region_runs(piece_region(t, pc, "checkpoint save"));
      runs.insert(runs.end(), r.begin(), r.end());
    }
    check_runs_cover(t, std::move(runs), "checkpoint save refused: ", true);
  }
}

}  // namespace

ShardedSave begin_sharded_save(const std::string& root, const CheckpointMeta& meta,
                               Communicator* world) {
  SaveFaults& faults = save_faults();
  ++faults.saves;
  const int rank = world ? world->rank() : 0, ranks = world ? world->size() : 1;
  // One temporary directory for all ranks, named by rank 0's process id.
  int64_t id = rank == 0 ? ::getpid() : 0;
  if (ranks > 1)
    world->all_reduce(Tensor::contiguous_view(&id, DType::i64, Device::cpu, {1}, "id"),
                      ReduceOp::max);
  const std::string name = step_name(meta.step);
  ShardedSave save{root, meta, (fs::path(root) / (name + ".tmp-" + std::to_string(id))).string(),
                   rank};
  if (rank == 0) {
    fs::remove_all(save.tmp_dir);
    fs::create_directories(save.tmp_dir);
  }
  if (ranks > 1) world->barrier();
  return save;
}

std::string write_rank_file(const ShardedSave& save, const std::vector<CheckpointPiece>& pieces) {
  h5_quiet();
  SaveFaults& faults = save_faults();
  const int rank = save.rank;
  const fs::path tmp = save.tmp_dir;
  faults.hit("before_data", rank);
  char fname[32];
  std::snprintf(fname, sizeof(fname), "rank_%05d.h5", rank);
  const std::string file = (tmp / fname).string();
  json mine = {{"file", fname}, {"pieces", json::array()}};
  {
    H5Id fapl = file_access();
    H5Id f(H5_CHECK(H5Fcreate(file.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl)));
    // No modification times in objects: the same state gives the same bytes.
    H5Id gcpl(H5_CHECK(H5Pcreate(H5P_GROUP_CREATE))), dcpl(H5_CHECK(H5Pcreate(H5P_DATASET_CREATE)));
    H5_CHECK(H5Pset_obj_track_times(gcpl, false));
    H5_CHECK(H5Pset_obj_track_times(dcpl, false));
    std::set<std::string> groups;
    // The pieces' digests, in parallel (hashing is half the work of a save).
    std::vector<std::string> digests(pieces.size());
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < pieces.size(); ++i)
      digests[i] = sha256_bytes(pieces[i].data, pieces[i].count * dtype_size(pieces[i].dtype));
    for (size_t i = 0; i < pieces.size(); ++i) {
      const CheckpointPiece& pc = pieces[i];
      if (groups.insert(pc.kind).second)
        H5Id(H5_CHECK(H5Gcreate2(f, ("/" + pc.kind).c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT)));
      const Region rg = make_region(pc.shape, pc.box_offset, pc.box_shape, pc.start, pc.count,
                                    "checkpoint piece " + pc.kind + "/" + pc.name);
      // A whole tensor or box keeps its shape; a part of one is a 1-D run of its elements.
      const bool full = rg.start == 0 && rg.count == rg.volume();
      const std::vector<int64_t>& full_shape = rg.off.empty() ? rg.shape : rg.ext;
      std::vector<hsize_t> dims = full ? std::vector<hsize_t>(full_shape.begin(), full_shape.end())
                                       : std::vector<hsize_t>{static_cast<hsize_t>(pc.count)};
      H5Id space(H5_CHECK(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)));
      const std::string ds = piece_dataset(pc.kind + "/" + pc.name, rg);
      H5Id d(H5_CHECK(
          H5Dcreate2(f, ds.c_str(), h5_type(pc.dtype), space, H5P_DEFAULT, dcpl, H5P_DEFAULT)));
      H5_CHECK(H5Dwrite(d, h5_native(pc.dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, pc.data));
      json entry = {
          {"kind", pc.kind},   {"name", pc.name},     {"dtype", std::string(dtype_name(pc.dtype))},
          {"shape", pc.shape}, {"start", pc.start},   {"count", pc.count},
          {"dataset", ds},     {"sha256", digests[i]}};
      if (!rg.off.empty()) entry["box_offset"] = rg.off, entry["box_shape"] = rg.ext;
      mine["pieces"].push_back(entry);
    }
  }
  faults.hit("before_fsync", rank);
  fsync_path(file);
  mine["sha256"] = sha256_file(file);
  return mine.dump();
}

std::string commit_sharded_save(const ShardedSave& save, const std::string& report,
                                Communicator* world) {
  SaveFaults& faults = save_faults();
  const int ranks = world ? world->size() : 1;
  const bool lead = save.rank == 0;
  const CheckpointMeta& meta = save.meta;
  const fs::path tmp = save.tmp_dir, root = save.root;
  const fs::path final_dir = root / step_name(meta.step);
  const std::vector<std::string> reports = gather_strings(report, world);
  if (lead) {
    faults.hit("before_manifest");
    json files = json::array(), tensors = json::array();
    std::map<std::string, size_t> index;  // "kind/name" -> position in tensors
    for (const std::string& text : reports) {
      const json r = json::parse(text);
      files.push_back({{"name", r.at("file")}, {"sha256", r.at("sha256")}});
      for (const json& pc : r.at("pieces")) {
        const std::string key =
            pc.at("kind").get<std::string>() + "/" + pc.at("name").get<std::string>();
        if (!index.count(key)) {
          index[key] = tensors.size();
          tensors.push_back({{"kind", pc.at("kind")},
                             {"name", pc.at("name")},
                             {"dtype", pc.at("dtype")},
                             {"shape", pc.at("shape")},
                             {"pieces", json::array()}});
        }
        json entry = {{"file", r.at("file")},
                      {"dataset", pc.at("dataset")},
                      {"start", pc.at("start")},
                      {"count", pc.at("count")},
                      {"sha256", pc.at("sha256")}};
        if (pc.contains("box_offset"))
          entry["box_offset"] = pc.at("box_offset"), entry["box_shape"] = pc.at("box_shape");
        tensors[index[key]]["pieces"].push_back(entry);
      }
    }
    check_coverage(tensors);
    const json manifest = {{"format_version", kCheckpointFormat},
                           {"step", meta.step},
                           {"consumed_samples", meta.consumed_samples},
                           {"seed", meta.seed},
                           {"config", meta.config},
                           {"files", files},
                           {"tensors", tensors}};
    const std::string mpath = (tmp / "manifest.json").string();
    {
      const std::string text = manifest.dump(1) + "\n";
      std::ofstream out(mpath);
      out << text.substr(0, text.size() / 2) << std::flush;
      faults.hit("mid_manifest");
      out << text.substr(text.size() / 2);
      BRAID_CHECK(out.good(), "cannot write ", mpath);
    }
    fsync_path(mpath);
    faults.hit("before_rename");
    fs::remove_all(final_dir);  // a checkpoint of the same step from an earlier, interrupted run
    fs::rename(tmp, final_dir);
    fsync_path(root.string());
  }
  if (ranks > 1) world->barrier();  // committed before any rank goes on
  return final_dir.string();
}

std::string save_checkpoint_sharded(const std::string& root, const CheckpointMeta& meta,
                                    const std::vector<CheckpointPiece>& pieces,
                                    Communicator* world) {
  const ShardedSave save = begin_sharded_save(root, meta, world);
  return commit_sharded_save(save, write_rank_file(save, pieces), world);
}

std::string latest_checkpoint(const std::string& root) {
  const std::vector<std::string> all = committed_checkpoints(root);
  return all.empty() ? "" : all.front();
}

void check_checkpoint_files(const std::string& dir) {
  const json m = read_manifest(dir);
  read_checkpoint_meta(dir);  // format version and the fields every checkpoint has
  for (const json& f : m.at("files")) check_file_digest(dir, f);
}

std::vector<std::string> committed_checkpoints(const std::string& root) {
  std::vector<std::pair<int64_t, std::string>> found;
  if (fs::is_directory(root)) {
    const std::regex re("step_([0-9]{8})");
    for (const auto& e : fs::directory_iterator(root)) {
      std::smatch m;
      const std::string n = e.path().filename().string();
      if (e.is_directory() && std::regex_match(n, m, re) && fs::exists(e.path() / "manifest.json"))
        found.push_back({std::stoll(m[1].str()), e.path().string()});
    }
  }
  std::sort(found.rbegin(), found.rend());
  std::vector<std::string> out;
  for (const auto& [_, d] : found) out.push_back(d);
  return out;
}

std::string latest_valid_checkpoint(const std::string& root, std::vector<std::string>* skipped) {
  for (const std::string& dir : committed_checkpoints(root)) {
    try {
      check_checkpoint_files(dir);
      return dir;
    } catch (const Error& e) {
      if (skipped) skipped->push_back(e.what());
    } catch (const json::exception& e) {
      if (skipped) skipped->push_back("checkpoint '" + dir + "': unreadable manifest: " + e.what());
    }
  }
  return "";
}

namespace {

// The manifest's tensors by "kind/name", after checking they are exactly `keys` (missing and
// unexpected names are both reported).
std::map<std::string, const json*> match_tensors(const json& m, const std::set<std::string>& keys,
                                                 const std::string& dir) {
  std::map<std::string, const json*> tensors;
  for (const json& t : m.at("tensors"))
    tensors[t.at("kind").get<std::string>() + "/" + t.at("name").get<std::string>()] = &t;
  std::string missing, unexpected;
  for (const std::string& key : keys)
    if (!tensors.count(key)) missing += (missing.empty() ? "" : ", ") + key;
  for (const auto& [key, _] : tensors)
    if (!keys.count(key)) unexpected += (unexpected.empty() ? "" : ", ") + key;
  BRAID_REQUIRE(missing.empty() && unexpected.empty(), "checkpoint '", dir,
                "' does not match this model: ", missing.empty() ? "" : "missing " + missing,
                missing.empty() || unexpected.empty() ? "" : "; ",
                unexpected.empty() ? "" : "unexpected " + unexpected);
  return tensors;
}

// Manifest tensor t (named key) has this model's shape and dtype.
void check_tensor_matches(const json& t, const std::string& key, const std::vector<int64_t>& shape,
                          DType dtype, const std::string& dir) {
  BRAID_REQUIRE(t.at("shape").get<std::vector<int64_t>>() == shape, "checkpoint '", dir, "': ", key,
                " has a shape of ", t.at("shape").size(), " dims that differs from this model's ",
                shape.size(), "-dim one");
  BRAID_REQUIRE(t.at("dtype").get<std::string>() == dtype_name(dtype), "checkpoint '", dir,
                "': ", key, " is ", t.at("dtype").get<std::string>(), ", this model stores ",
                dtype_name(dtype));
}

// The files of a checkpoint opened read-only on first use.
class CheckpointFiles {
 public:
  explicit CheckpointFiles(std::string dir) : dir_(std::move(dir)) {}
  hid_t get(const std::string& name) {
    auto it = open_.find(name);
    if (it != open_.end()) return *it->second;
    BRAID_REQUIRE(name.find('/') == std::string::npos && name.find("..") == std::string::npos,
                  "checkpoint '", dir_, "': file name '", name,
                  "' leaves the checkpoint directory");
    H5Id fapl = file_access();
    const std::string path = (fs::path(dir_) / name).string();
    auto id = std::make_unique<H5Id>(H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl)));
    return *open_.emplace(name, std::move(id)).first->second;
  }

 private:
  std::string dir_;
  std::map<std::string, std::unique_ptr<H5Id>> open_;
};

// Opens the dataset of piece pc (region rg) of tensor `key`, checking its name and size.
H5Id open_piece(const json& pc, const Region& rg, const std::string& key, const std::string& dir,
                CheckpointFiles& files) {
  const std::string file = pc.at("file").get<std::string>(),
                    ds = pc.at("dataset").get<std::string>();
  BRAID_REQUIRE(ds == piece_dataset(key, rg), "checkpoint '", dir, "': ", key,
                " points at dataset '", ds, "'");
  H5Id d(open_dataset_checked(files.get(file), ds, dir, file));
  H5Id space(H5_CHECK(H5Dget_space(d)));
  BRAID_REQUIRE(H5Sget_simple_extent_npoints(space) == rg.count, "checkpoint '", dir, "': dataset ",
                ds, " in ", file, " has ", H5Sget_simple_extent_npoints(space),
                " elements, the manifest says ", rg.count);
  return d;
}

// Reads every piece of manifest tensor t into dst (the whole tensor, of dtype), checking that
// together they cover the tensor exactly once and, with piece_digests, that each matches its
// digest (verify: names the dataset at fault; a load has checked the files' digests already).
void read_tensor(const json& t, const std::string& dir, CheckpointFiles& files, void* dst,
                 DType dtype, bool piece_digests) {
  const std::string key = t.at("kind").get<std::string>() + "/" + t.at("name").get<std::string>();
  const size_t esize = dtype_size(dtype);
  std::vector<Run> all;
  std::vector<char> buf;
  for (const json& pc : t.at("pieces")) {
    const Region rg = piece_region(t, pc, "checkpoint '" + dir + "': " + key);
    H5Id d = open_piece(pc, rg, key, dir, files);
    buf.resize(rg.count * esize);
    H5_CHECK(H5Dread(d, h5_native(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()));
    BRAID_REQUIRE(!piece_digests ||
                      sha256_bytes(buf.data(), buf.size()) == pc.at("sha256").get<std::string>(),
                  "checkpoint '", dir, "': dataset ", pc.at("dataset").get<std::string>(), " in ",
                  pc.at("file").get<std::string>(), " does not match its digest");
    for (const Run& r : region_runs(rg)) {
      std::memcpy(static_cast<char*>(dst) + r.global * esize, buf.data() + r.local * esize,
                  r.len * esize);
      all.push_back(r);
    }
  }
  check_runs_cover(t, std::move(all), "checkpoint '" + dir + "': the pieces of ", false);
}

}  // namespace

CheckpointSummary inspect_checkpoint(const std::string& dir) {
  const json m = read_manifest(dir);
  CheckpointSummary sum;
  sum.meta = read_checkpoint_meta(dir);
  for (const json& t : m.at("tensors")) {
    const std::string kind = t.at("kind").get<std::string>();
    DType dtype{};
    BRAID_REQUIRE(dtype_from_name(t.at("dtype").get<std::string>(), &dtype), "checkpoint '", dir,
                  "': ", kind, "/", t.at("name").get<std::string>(), " has unknown dtype ",
                  t.at("dtype").get<std::string>());
    int64_t numel = 1;
    for (int64_t x : t.at("shape").get<std::vector<int64_t>>()) numel *= x;
    ++sum.tensors[kind];
    sum.elements[kind] += numel;
    sum.bytes += numel * static_cast<int64_t>(dtype_size(dtype));
  }
  for (const json& f : m.at("files")) sum.files.push_back(f.at("name").get<std::string>());
  return sum;
}

CheckpointSummary verify_checkpoint(const std::string& dir) {
  h5_quiet();
  check_checkpoint_files(dir);
  const json m = read_manifest(dir);
  const CheckpointSummary sum = inspect_checkpoint(dir);
  CheckpointFiles files(dir);
  for (const json& t : m.at("tensors")) {
    DType dtype{};
    BRAID_REQUIRE(dtype_from_name(t.at("dtype").get<std::string>(), &dtype), "checkpoint '", dir,
                  "': ", t.at("kind").get<std::string>(), "/", t.at("name").get<std::string>(),
                  " has unknown dtype ", t.at("dtype").get<std::string>());
    int64_t numel = 1;
    for (int64_t x : t.at("shape").get<std::vector<int64_t>>()) numel *= x;
    std::vector<char> bytes(numel * dtype_size(dtype));
    read_tensor(t, dir, files, bytes.data(), dtype, true);
  }
  return sum;
}

std::string convert_checkpoint(const std::string& src, const std::string& dst_root) {
  h5_quiet();
  check_checkpoint_files(src);
  const json m = read_manifest(src);
  CheckpointFiles files(src);
  std::vector<std::vector<char>> buffers;
  std::vector<CheckpointTensor> tensors;
  for (const json& t : m.at("tensors")) {
    DType dtype{};
    BRAID_REQUIRE(dtype_from_name(t.at("dtype").get<std::string>(), &dtype), "checkpoint '", src,
                  "': ", t.at("kind").get<std::string>(), "/", t.at("name").get<std::string>(),
                  " has unknown dtype ", t.at("dtype").get<std::string>());
    const std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (int64_t x : shape) numel *= x;
    buffers.emplace_back(numel * dtype_size(dtype));
    read_tensor(t, src, files, buffers.back().data(), dtype, true);
    tensors.push_back({t.at("kind").get<std::string>(), t.at("name").get<std::string>(),
                       Tensor::contiguous_view(buffers.back().data(), dtype, Device::cpu, shape,
                                               t.at("name").get<std::string>())});
  }
  return save_checkpoint(dst_root, read_checkpoint_meta(src), tensors);
}

CheckpointMeta read_checkpoint_meta(const std::string& dir) {
  const json m = read_manifest(dir);
  const int version = m.value("format_version", 0);
  BRAID_REQUIRE(version >= 1 && version <= kCheckpointFormat, "checkpoint '", dir,
                "': format version ", version, ", this build reads 1 to ", kCheckpointFormat);
  CheckpointMeta meta;
  meta.step = m.at("step").get<int64_t>();
  meta.consumed_samples = m.at("consumed_samples").get<int64_t>();
  meta.seed = m.at("seed").get<uint64_t>();
  meta.config = m.at("config").get<std::map<std::string, std::string>>();
  return meta;
}

void load_checkpoint(const std::string& dir, ParamSet& params, AdamW& opt) {
  load_checkpoint(dir, training_state(params, opt));
  opt.set_steps_taken(read_checkpoint_meta(dir).step);
}

void load_checkpoint(const std::string& dir, const std::vector<CheckpointTensor>& entries) {
  h5_quiet();
  const json m = read_manifest(dir);
  check_checkpoint_files(dir);  // digests before libhdf5 sees a byte
  std::map<std::string, Tensor> expected;
  std::set<std::string> keys;
  for (const CheckpointTensor& e : entries) {
    expected[e.kind + "/" + e.name] = e.tensor;
    keys.insert(e.kind + "/" + e.name);
  }
  CheckpointFiles files(dir);
  for (const auto& [key, t] : match_tensors(m, keys, dir)) {
    const Tensor& dst = expected.at(key);
    check_tensor_matches(*t, key,
                         std::vector<int64_t>(dst.shape.begin(), dst.shape.begin() + dst.ndim),
                         dst.dtype, dir);
    read_tensor(*t, dir, files, dst.data, dst.dtype, false);
  }
}

void load_checkpoint_ranges(const std::string& dir, const std::vector<CheckpointRead>& reads) {
  h5_quiet();
  const json m = read_manifest(dir);
  read_checkpoint_meta(dir);  // format version
  std::set<std::string> keys;
  for (const CheckpointRead& r : reads) keys.insert(r.kind + "/" + r.name);
  const std::map<std::string, const json*> tensors = match_tensors(m, keys, dir);
  // The pieces each read needs (and where the two overlap), and the files they are in.
  struct Need {
    const CheckpointRead* read;
    const json* piece;
    Region region;
    std::vector<Overlap> parts;  // a: in the piece's storage, b: in the read's
  };
  std::vector<Need> needs;
  std::set<std::string> files_needed;
  for (const CheckpointRead& r : reads) {
    const std::string key = r.kind + "/" + r.name;
    const json& t = *tensors.at(key);
    check_tensor_matches(t, key, r.shape, r.dtype, dir);
    const std::vector<Run> want = region_runs(make_region(
        r.shape, r.box_offset, r.box_shape, r.start, r.count, "checkpoint read of " + key));
    int64_t covered = 0;
    for (const json& pc : t.at("pieces")) {
      Region rg = piece_region(t, pc, "checkpoint '" + dir + "': " + key);
      std::vector<Overlap> parts = overlaps(region_runs(rg), want);
      if (parts.empty()) continue;
      for (const Overlap& o : parts) covered += o.len;
      files_needed.insert(pc.at("file").get<std::string>());
      needs.push_back({&r, &pc, std::move(rg), std::move(parts)});
    }
    BRAID_REQUIRE(covered == r.count, "checkpoint '", dir, "': the pieces of ", key,
                  " do not cover the ", r.count, " elements read");
  }
  // Digests of the files this rank reads, before libhdf5 opens them.
  for (const json& f : m.at("files")) {
    const std::string name = f.at("name").get<std::string>();
    if (!files_needed.count(name)) continue;
    check_file_digest(dir, f);
    files_needed.erase(name);
  }
  BRAID_REQUIRE(files_needed.empty(), "checkpoint '", dir, "': pieces refer to ",
                files_needed.empty() ? "" : *files_needed.begin(),
                ", which the manifest does not list");
  CheckpointFiles files(dir);
  std::vector<char> buf;
  for (const Need& need : needs) {
    const CheckpointRead& r = *need.read;
    const size_t esize = dtype_size(r.dtype);
    H5Id d = open_piece(*need.piece, need.region, r.kind + "/" + r.name, dir, files);
    H5Id space(H5_CHECK(H5Dget_space(d)));
    // Of a 1-D piece, the range spanning the parts needed; else the whole piece.
    int64_t lo = 0, hi = need.region.count;
    if (H5Sget_simple_extent_ndims(space) == 1) {
      lo = hi, hi = 0;
      for (const Overlap& o : need.parts) lo = std::min(lo, o.a), hi = std::max(hi, o.a + o.len);
      const hsize_t off[1] = {static_cast<hsize_t>(lo)}, cnt[1] = {static_cast<hsize_t>(hi - lo)};
      H5_CHECK(H5Sselect_hyperslab(space, H5S_SELECT_SET, off, nullptr, cnt, nullptr));
      H5Id mem(H5_CHECK(H5Screate_simple(1, cnt, nullptr)));
      buf.resize((hi - lo) * esize);
      H5_CHECK(H5Dread(d, h5_native(r.dtype), mem, space, H5P_DEFAULT, buf.data()));
    } else {
      buf.resize(hi * esize);
      H5_CHECK(H5Dread(d, h5_native(r.dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()));
    }
    for (const Overlap& o : need.parts)
      std::memcpy(static_cast<char*>(r.dst) + o.b * esize, buf.data() + (o.a - lo) * esize,
                  o.len * esize);
  }
}

std::vector<CheckpointRead> zero1_reads(ParamSet& params, const Zero1AdamW& opt,
                                        std::vector<float>& master, std::vector<float>& m,
                                        std::vector<float>& v) {
  master.assign(opt.shard_size(), 0.f), m.assign(opt.shard_size(), 0.f);
  v.assign(opt.shard_size(), 0.f);
  std::vector<CheckpointRead> out;
  for (Param& p : params.all())
    for (const BoxRun& b :
         p.region == opt.region() ? box_runs(p, 0, p.value.numel()) : std::vector<BoxRun>{})
      out.push_back({"param", p.name, p.value.dtype, p.global_shape, b.start, b.count,
                     static_cast<char*>(p.value.data) + b.at * dtype_size(p.value.dtype), b.off,
                     b.ext});
  for (const Zero1Run& r : zero1_runs(params, opt))
    for (auto [kind, vec] :
         {std::pair{"master", &master}, std::pair{"exp_avg", &m}, std::pair{"exp_avg_sq", &v}})
      for (const BoxRun& b : box_runs(*r.param, r.start, r.count))
        out.push_back({kind, r.param->name, DType::f32, r.param->global_shape, b.start, b.count,
                       r.count ? vec->data() + r.shard_off + b.at : nullptr, b.off, b.ext});
  return out;
}

void prune_checkpoints(const std::string& root, int64_t keep, int64_t keep_every) {
  if (!fs::is_directory(root) || keep <= 0) return;
  const std::regex done("step_([0-9]{8})"), tmp("step_[0-9]{8}\\.tmp-[0-9]+");
  std::vector<std::string> steps;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (std::regex_match(n, tmp)) {
      // Left by a run that died mid-save (single writer: not this process's in-flight save).
      fs::remove_all(e.path());
    } else if (std::regex_match(n, done) && fs::exists(e.path() / "manifest.json")) {
      steps.push_back(n);
    }
  }
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + keep < steps.size(); ++i) {
    const int64_t step = std::stoll(steps[i].substr(5));
    if (keep_every > 0 && step % keep_every == 0) continue;  // kept forever
    fs::remove_all(fs::path(root) / steps[i]);
  }
}

std::vector<std::string> config_differences(const std::map<std::string, std::string>& saved,
                                            const std::map<std::string, std::string>& current,
                                            const std::vector<std::string>& prefixes) {
  std::vector<std::string> out;
  auto in_sections = [&](const std::string& k) {
    for (const auto& p : prefixes)
      if (k.rfind(p, 0) == 0) return true;
    return false;
  };
  std::set<std::string> keys;
  for (const auto& [k, _] : saved) keys.insert(k);
  for (const auto& [k, _] : current) keys.insert(k);
  for (const std::string& k : keys) {
    if (!in_sections(k)) continue;
    const auto a = saved.find(k), b = current.find(k);
    const std::string va = a == saved.end() ? "(absent)" : a->second,
                      vb = b == current.end() ? "(absent)" : b->second;
    if (va != vb) out.push_back(k + ": checkpoint " + va + ", this run " + vb);
  }
  return out;
}

}  // namespace braid
