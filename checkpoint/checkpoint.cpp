#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
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

constexpr const char* kFile = "rank_00000.h5";

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

// Opens dataset `ds` ("/kind/name") of a checkpoint file, refusing what could make libhdf5 read
// outside the file or run code: every link on the path must be a hard link (no soft or external
// links), and the dataset must be stored in the file itself, without filters (no plugins) and
// not virtual.
hid_t open_dataset_checked(hid_t f, const std::string& ds, const std::string& dir) {
  for (size_t at = ds.find('/', 1);; at = ds.find('/', at + 1)) {
    const std::string prefix = at == std::string::npos ? ds : ds.substr(0, at);
    H5L_info_t info;
    BRAID_REQUIRE(H5Lexists(f, prefix.c_str(), H5P_DEFAULT) > 0 &&
                      H5Lget_info(f, prefix.c_str(), &info, H5P_DEFAULT) >= 0,
                  "checkpoint '", dir, "': dataset ", ds, " is missing from ", kFile);
    BRAID_REQUIRE(info.type == H5L_TYPE_HARD, "checkpoint '", dir, "': ", prefix, " in ", kFile,
                  " is ", info.type == H5L_TYPE_EXTERNAL ? "an external" : "a soft",
                  " link; checkpoints hold only their own data");
    if (at == std::string::npos) break;
  }
  const hid_t d = H5Dopen2(f, ds.c_str(), H5P_DEFAULT);
  BRAID_REQUIRE(d >= 0, "checkpoint '", dir, "': ", ds, " in ", kFile, " is not a dataset");
  H5Id dcpl(H5_CHECK(H5Dget_create_plist(d)));
  const H5D_layout_t layout = H5Pget_layout(dcpl);
  const int filters = H5Pget_nfilters(dcpl), external = H5Pget_external_count(dcpl);
  if (layout == H5D_VIRTUAL || filters != 0 || external != 0) {
    H5Dclose(d);
    BRAID_REJECT("checkpoint '", dir, "': dataset ", ds, " in ", kFile, " is ",
                 layout == H5D_VIRTUAL ? "virtual"
                 : filters != 0        ? "filtered (a filter pipeline)"
                                       : "stored in external files",
                 "; checkpoints hold plain datasets only");
  }
  return d;
}

// Fault injection for the save-interruption tests: BRAID_FAULT_SAVE=<point>:<n> ends the process
// at once (status 86, as a crash would) when the n-th save of this process reaches <point>:
// before_data, before_fsync, before_manifest, mid_manifest (half the manifest written),
// before_rename. Unset: nothing happens. The save count is the one piece of process state this
// needs.
struct SaveFaults {
  std::string point;
  int64_t nth = 0, saves = 0;
  SaveFaults() {
    const char* e = std::getenv("BRAID_FAULT_SAVE");
    if (!e) return;
    const std::string v = e;
    const size_t colon = v.find(':');
    point = v.substr(0, colon);
    nth = colon == std::string::npos ? 1 : std::stoll(v.substr(colon + 1));
  }
  void hit(const char* at) const {
    if (!point.empty() && point == at && saves == nth) {
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

std::vector<CheckpointTensor> training_state(const ParamSet& params, const AdamW& opt) {
  std::vector<CheckpointTensor> out;
  for (const Param& p : params.all()) out.push_back({"param", p.name, p.value});
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

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta,
                            const std::vector<CheckpointTensor>& entries) {
  h5_quiet();
  SaveFaults& faults = save_faults();
  ++faults.saves;
  const std::string name = step_name(meta.step);
  const fs::path final_dir = fs::path(root) / name;
  const fs::path tmp = fs::path(root) / (name + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  faults.hit("before_data");
  const std::string file = (tmp / kFile).string();
  json tensors = json::array();
  {
    H5Id fapl = file_access();
    H5Id f(H5_CHECK(H5Fcreate(file.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl)));
    // No modification times in objects: the same state gives the same bytes.
    H5Id gcpl(H5_CHECK(H5Pcreate(H5P_GROUP_CREATE))), dcpl(H5_CHECK(H5Pcreate(H5P_DATASET_CREATE)));
    H5_CHECK(H5Pset_obj_track_times(gcpl, false));
    H5_CHECK(H5Pset_obj_track_times(dcpl, false));
    std::set<std::string> groups;
    for (const CheckpointTensor& e : entries) {
      if (groups.insert(e.kind).second)
        H5Id(H5_CHECK(H5Gcreate2(f, ("/" + e.kind).c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT)));
      const Tensor& t = e.tensor;
      BRAID_CHECK(t.device == Device::cpu && t.is_contiguous(), "checkpoint: ", t.describe(),
                  " must be a contiguous host tensor");
      std::vector<hsize_t> dims(t.shape.begin(), t.shape.begin() + t.ndim);
      H5Id space(H5_CHECK(H5Screate_simple(t.ndim, dims.data(), nullptr)));
      const std::string ds = "/" + e.kind + "/" + e.name;
      H5Id d(H5_CHECK(
          H5Dcreate2(f, ds.c_str(), h5_type(t.dtype), space, H5P_DEFAULT, dcpl, H5P_DEFAULT)));
      H5_CHECK(H5Dwrite(d, h5_native(t.dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data));
      json piece = {{"file", kFile},
                    {"dataset", ds},
                    {"offset", std::vector<int64_t>(t.ndim, 0)},
                    {"extent", std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim)},
                    {"sha256", sha256_bytes(t.data, t.nbytes())}};
      tensors.push_back({{"kind", e.kind},
                         {"name", e.name},
                         {"dtype", std::string(dtype_name(t.dtype))},
                         {"shape", piece["extent"]},
                         {"pieces", json::array({piece})}});
    }
  }
  faults.hit("before_fsync");
  fsync_path(file);
  faults.hit("before_manifest");
  const json manifest = {{"format_version", kCheckpointFormat},
                         {"step", meta.step},
                         {"consumed_samples", meta.consumed_samples},
                         {"seed", meta.seed},
                         {"config", meta.config},
                         {"files", {{{"name", kFile}, {"sha256", sha256_file(file)}}}},
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
  fsync_path(root);
  return final_dir.string();
}

std::string latest_checkpoint(const std::string& root) {
  const std::vector<std::string> all = committed_checkpoints(root);
  return all.empty() ? "" : all.front();
}

void check_checkpoint_files(const std::string& dir) {
  const json m = read_manifest(dir);
  read_checkpoint_meta(dir);  // format version and the fields every checkpoint has
  for (const json& f : m.at("files")) {
    const std::string name = f.at("name").get<std::string>();
    BRAID_REQUIRE(name.find('/') == std::string::npos && name.find("..") == std::string::npos,
                  "checkpoint '", dir, "': file name '", name, "' leaves the checkpoint directory");
    const std::string path = (fs::path(dir) / name).string();
    BRAID_REQUIRE(fs::exists(path), "checkpoint '", dir, "': file ", name, " is missing");
    const std::string got = sha256_file(path), want = f.at("sha256").get<std::string>();
    BRAID_REQUIRE(got == want, "checkpoint '", dir, "': file ", name, " is corrupt (sha256 ", got,
                  ", manifest says ", want, ")");
  }
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
  H5Id fapl = file_access();
  const std::string file = (fs::path(dir) / kFile).string();
  H5Id f(H5_CHECK(H5Fopen(file.c_str(), H5F_ACC_RDONLY, fapl)));
  for (const json& t : m.at("tensors")) {
    const std::string kind = t.at("kind").get<std::string>(),
                      name = t.at("name").get<std::string>();
    DType dtype{};
    BRAID_REQUIRE(dtype_from_name(t.at("dtype").get<std::string>(), &dtype), "checkpoint '", dir,
                  "': ", kind, "/", name, " has unknown dtype ", t.at("dtype").get<std::string>());
    const std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (int64_t x : shape) numel *= x;
    const json& piece = t.at("pieces").at(0);
    const std::string ds = piece.at("dataset").get<std::string>();
    BRAID_REQUIRE(ds == "/" + kind + "/" + name, "checkpoint '", dir, "': ", kind, "/", name,
                  " points at dataset '", ds, "'");
    H5Id d(open_dataset_checked(f, ds, dir));
    H5Id space(H5_CHECK(H5Dget_space(d)));
    BRAID_REQUIRE(H5Sget_simple_extent_npoints(space) == numel, "checkpoint '", dir, "': dataset ",
                  ds, " has ", H5Sget_simple_extent_npoints(space), " elements, the manifest says ",
                  numel);
    std::vector<char> bytes(numel * dtype_size(dtype));
    H5_CHECK(H5Dread(d, h5_native(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()));
    BRAID_REQUIRE(sha256_bytes(bytes.data(), bytes.size()) == piece.at("sha256").get<std::string>(),
                  "checkpoint '", dir, "': dataset ", ds, " in ", kFile,
                  " does not match its digest");
  }
  return sum;
}

CheckpointMeta read_checkpoint_meta(const std::string& dir) {
  const json m = read_manifest(dir);
  BRAID_REQUIRE(m.value("format_version", 0) == kCheckpointFormat, "checkpoint '", dir,
                "': format version ", m.value("format_version", 0), ", this build reads ",
                kCheckpointFormat);
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
  // Strict keys.
  std::map<std::string, Tensor> expected;
  for (const CheckpointTensor& e : entries) expected[e.kind + "/" + e.name] = e.tensor;
  std::set<std::string> found;
  std::string unexpected, missing;
  for (const json& t : m.at("tensors")) {
    const std::string key = t.at("kind").get<std::string>() + "/" + t.at("name").get<std::string>();
    found.insert(key);
    if (!expected.count(key)) unexpected += (unexpected.empty() ? "" : ", ") + key;
  }
  for (const auto& [key, _] : expected)
    if (!found.count(key)) missing += (missing.empty() ? "" : ", ") + key;
  BRAID_REQUIRE(missing.empty() && unexpected.empty(), "checkpoint '", dir,
                "' does not match this model: ", missing.empty() ? "" : "missing " + missing,
                missing.empty() || unexpected.empty() ? "" : "; ",
                unexpected.empty() ? "" : "unexpected " + unexpected);
  H5Id fapl = file_access();
  const std::string file = (fs::path(dir) / kFile).string();
  H5Id f(H5_CHECK(H5Fopen(file.c_str(), H5F_ACC_RDONLY, fapl)));
  for (const json& t : m.at("tensors")) {
    const std::string key = t.at("kind").get<std::string>() + "/" + t.at("name").get<std::string>();
    const Tensor& dst = expected.at(key);
    const std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
    BRAID_REQUIRE(shape == std::vector<int64_t>(dst.shape.begin(), dst.shape.begin() + dst.ndim),
                  "checkpoint '", dir, "': ", key, " has shape of ", shape.size(),
                  " dims that differs from this model's ", dst.describe());
    BRAID_REQUIRE(t.at("dtype").get<std::string>() == dtype_name(dst.dtype), "checkpoint '", dir,
                  "': ", key, " is ", t.at("dtype").get<std::string>(), ", this model stores ",
                  dtype_name(dst.dtype));
    const json& piece = t.at("pieces").at(0);
    const std::string ds = piece.at("dataset").get<std::string>();
    BRAID_REQUIRE(ds == "/" + key, "checkpoint '", dir, "': ", key, " points at dataset '", ds,
                  "'");
    H5Id d(open_dataset_checked(f, ds, dir));
    H5Id space(H5_CHECK(H5Dget_space(d)));
    BRAID_REQUIRE(H5Sget_simple_extent_npoints(space) == dst.numel(), "checkpoint '", dir,
                  "': dataset ", ds, " has ", H5Sget_simple_extent_npoints(space),
                  " elements, expected ", dst.numel());
    H5_CHECK(H5Dread(d, h5_native(dst.dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, dst.data));
    BRAID_REQUIRE(sha256_bytes(dst.data, dst.nbytes()) == piece.at("sha256").get<std::string>(),
                  "checkpoint '", dir, "': dataset ", ds, " does not match its digest");
  }
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
